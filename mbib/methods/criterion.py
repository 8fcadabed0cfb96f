"""The base of every method's loss module: forward(outputs, labels) -> (loss, detached terms), with the logits it
reads checked against the model's heads and the class count."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from mbib.errors import ConfigError
from mbib.losses import functional as L


class Criterion(nn.Module):
    """Base of every training loss; subclasses implement ``loss_terms`` returning a dict with "total"."""

    def __init__(self, method: str, head: str, class_counts: Tensor) -> None:
        super().__init__()
        self.method = method
        self.head = head
        self.num_classes = int(class_counts.numel())
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of every (0-based) epoch; only LDAM-DRW uses it."""
        self.epoch = int(epoch)

    def class_weight_table(self, epochs: int) -> Tensor | None:
        """[epochs, K] the class weights the loss applies in each epoch, for a captured step's table; None: it
        applies none (every method but LDAM-DRW)."""
        return None

    def read_class_weights_from(self, weights: Tensor) -> None:
        """Apply `weights` (a device row a captured step refills each epoch) in place of the epoch's own."""
        raise NotImplementedError(f"{type(self).__name__} applies no class weights")

    def no_weight_decay_params(self) -> list[nn.Parameter]:
        """The loss's own parameters the optimiser must not decay (none but GML's log temperatures)."""
        return []

    def forward(self, outputs: Mapping[str, Tensor], labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        terms = self.loss_terms(outputs, labels)
        return terms["total"], {name: value.detach() for name, value in terms.items()}

    def loss_terms(self, outputs: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def logits(self, outputs: Mapping[str, Tensor], keys: list[str]) -> dict[str, Tensor]:
        """The named logits in float32 (fp16 softmax / log n lose precision under AMP), shape-checked."""
        missing = [k for k in keys if k not in outputs]
        if missing:
            raise ConfigError(
                f"loss '{self.method}' needs logits {missing} but the model gave {sorted(outputs)}; "
                f"build the model with head='{self.head}'"
            )
        picked = {k: outputs[k].float() for k in keys}
        for key, value in picked.items():
            if value.ndim != 2 or value.shape[1] != self.num_classes:
                raise ConfigError(
                    f"logits '{key}' have shape {tuple(value.shape)} but class_counts has {self.num_classes} "
                    "classes; build the model with num_classes=len(class_counts)"
                )
        return picked

    def final_tap(self, outputs: Mapping[str, Tensor]) -> str:
        taps = L.tap_keys(outputs)
        if not taps:
            raise ConfigError(f"loss '{self.method}' needs a 'v' logit but the model gave {sorted(outputs)}; "
                              f"build the model with head='{self.head}'")
        return taps[-1]
