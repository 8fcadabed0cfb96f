"""Ray Serve entry point for mbib (see serve/app.py and the README's "Serve" section)."""
