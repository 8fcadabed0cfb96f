"""The anchor for bench/serve_throughput.py: the same decode + ONNX Runtime behind uvicorn, no Ray.

What a user would write instead of Ray Serve: one FastAPI process, one image per model call, the request's work
done inline on the event loop (one ORT thread: the same budget as one replica).

    MBIB_BENCH_MODEL=model.onnx uvicorn plain_asgi:app --app-dir bench --port 8001 --workers 1
"""

import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mbib.classifier import OnnxClassifier

model = OnnxClassifier(os.environ["MBIB_BENCH_MODEL"], num_threads=int(os.environ.get("MBIB_BENCH_THREADS", "1")),
                       use_cuda=False)
app = FastAPI()


@app.post("/classify")
async def classify(request: Request) -> JSONResponse:
    x = model.preprocess(await request.body())
    return JSONResponse({"predictions": model.top_k(model.probabilities(x[None])[0], 5)})


@app.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}
