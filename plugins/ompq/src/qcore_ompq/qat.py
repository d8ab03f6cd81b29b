"""QAT mode (the seed's second use of OMPQ's bits): fine-tune the calibrated mixed-precision model end to end.

``-o finetune_epochs=N`` (the ``ompq-qat`` output correction, which the ``ompq`` method selects; 0 = no
fine-tuning) runs after calibration (e.g. QDrop) on the task's training data, the calibration batches (a sample
of the training split; on the embedded Fashion-MNIST data ``--calib-size`` up to 2,048 images):

* **weights**: straight-through (STE) weights on each layer's own quantizer, qcore-recon's
  :class:`qcore_recon.STERounding` (``W' = W + step * clip(delta, -1, 1)``, ``delta`` learned with Adam at
  ``-o finetune_lr``): every weight moves at most one grid step, on the grid and with the ranges the calibrator
  set, and the quantizer quantizes ``W'`` at deployment;
* **activations**: LSQ step sizes (qcore-recon's :func:`qcore_recon.act_quant_for`: :class:`qcore_recon.LSQAct` on
  core's uniform grid, the quantizer as calibrated otherwise), Adam at ``-o finetune_act_lr``, committed into the
  quantizers' ranges afterwards;
* **loss**: distillation from the FP model (``-o distill=true``, the only loss implemented): KL(FP softmax ||
  quantized softmax) on the task's distortion target (logits). A label loss needs labelled training batches,
  which qcore's task API does not expose (``TaskInstance.calibration`` holds inputs only).

The model stays in eval mode (BN is folded; nothing else changes with the mode); batches of
``-o finetune_batch_size`` samples are drawn in a seeded order (``--seed``), so a run is deterministic on CPU.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import qcore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QATOptions:
    """``-o`` options of the ``ompq-qat`` fine-tuning."""

    finetune_epochs: int = field(default=0, metadata={
        "help": "QAT fine-tuning epochs over the calibration (training-split) data after calibration; 0 = none"})
    finetune_lr: float = field(default=1e-2, metadata={
        "help": "Adam learning rate of the STE weight offsets (in grid steps)"})
    finetune_act_lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the LSQ step sizes"})
    finetune_batch_size: int = field(default=32, metadata={"help": "samples per fine-tuning step"})
    distill: bool = field(default=True, metadata={
        "help": "distillation from the FP model (KL on the logits); false (a label loss) is not implemented"})

    def __post_init__(self) -> None:
        if self.finetune_epochs < 0:
            raise qcore.QcoreError(f"finetune_epochs={self.finetune_epochs} must be >= 0")
        if self.finetune_batch_size < 1:
            raise qcore.QcoreError(f"finetune_batch_size={self.finetune_batch_size} must be at least 1")
        for key in ("finetune_lr", "finetune_act_lr"):
            v = getattr(self, key)
            if not (v >= 0 and math.isfinite(v)):
                raise qcore.QcoreError(f"{key}={v} must be a finite number >= 0")


def distill_loss(out: Tensor, ref: Tensor) -> Tensor:
    """KL(softmax(ref) || softmax(out)) per sample (2-D logits), half the mean squared error otherwise."""
    if out.dim() == 2:
        return F.kl_div(F.log_softmax(out.float(), dim=1), F.log_softmax(ref.float(), dim=1), log_target=True,
                        reduction="batchmean")
    return 0.5 * (out.float() - ref.float()).pow(2).mean()


def _samples(batches: list[Any]) -> Tensor:
    if not batches or not all(isinstance(b, Tensor) for b in batches):
        raise qcore.NotImplementedMethodError("ompq QAT draws its own mini-batches and needs tensor calibration "
                                              "batches (classification-style tasks)")
    return torch.cat(batches, dim=0)


def finetune(qmodel: nn.Module, fp_model: nn.Module, ctx: qcore.RunContext, options: QATOptions
             ) -> dict[str, Any]:
    """Fine-tune ``qmodel`` (calibrated, frozen) in place as the module docstring says; returns what it did
    (epochs, steps, seconds per epoch, the loss at the start and end, the share of weights whose quantized
    value changed) for result.json."""
    from qcore_recon import STERounding, act_quant_for, learning_layers

    o = options
    if not o.distill:
        raise qcore.NotImplementedMethodError(
            "ompq QAT with a label loss (-o distill=false) is not implemented: the task API exposes calibration "
            "inputs without labels; use -o distill=true (distillation from the FP model)")
    x_all = _samples(list(ctx.calibration_batches()))
    device = qcore.module_device(qmodel)
    x_all = x_all.to(device)
    forward = ctx.task.forward
    with torch.no_grad():
        ref_all = torch.cat([forward(fp_model, x_all[i:i + 256]) for i in range(0, len(x_all), 256)])
    layers = qcore.quant_layers(qmodel)
    before = {n: layer.quantized_weight().detach().clone() for n, layer in layers.items()}

    def ste_weight(wq: Any, weight: Tensor) -> Any:
        return STERounding(wq, weight) if isinstance(wq, qcore.FakeQuantizer) else None

    def lsq_act(aq: Any) -> Any:
        return act_quant_for(aq, True) if isinstance(aq, qcore.FakeQuantizer) else None

    gen = torch.Generator().manual_seed(ctx.config.seed * 1000003 + 7)
    n_samples = len(x_all)
    bs = min(o.finetune_batch_size, n_samples)
    steps_per_epoch = max(n_samples // bs, 1)
    losses: list[float] = []
    epoch_seconds: list[float] = []
    frozen = [(p, p.requires_grad) for p in qmodel.parameters()]
    try:
        # the stand-ins write the trained weights back (deployed as is: weight corrections off while training)
        with learning_layers(layers, ste_weight, lsq_act) as (weights, acts):
            w_params = [p for r in weights.values() for p in r.parameters() if p.requires_grad]
            a_params = [p for a in acts.values() for p in a.parameters() if p.requires_grad]
            for p, _ in frozen:
                p.requires_grad_(False)
            for p in w_params + a_params:
                p.requires_grad_(True)
            opts = []
            if w_params and o.finetune_lr > 0:
                opts.append(torch.optim.Adam(w_params, lr=o.finetune_lr))
            if a_params and o.finetune_act_lr > 0:
                opts.append(torch.optim.Adam(a_params, lr=o.finetune_act_lr))
            for epoch in range(o.finetune_epochs):
                t0 = time.perf_counter()
                order = torch.randperm(n_samples, generator=gen)
                for s in qcore.track(range(steps_per_epoch), desc=f"ompq QAT epoch {epoch + 1}/{o.finetune_epochs}",
                                     unit="step", postfix=lambda: f"loss {losses[-1]:.4g}" if losses else ""):
                    idx = order[s * bs:(s + 1) * bs].to(device)
                    loss = distill_loss(forward(qmodel, x_all[idx]), ref_all[idx])
                    for opt in opts:
                        opt.zero_grad(set_to_none=True)
                    loss.backward()
                    for opt in opts:
                        opt.step()
                    losses.append(float(loss.detach()))
                epoch_seconds.append(time.perf_counter() - t0)
                log.info("ompq QAT epoch %d/%d: %d steps of %d samples, loss %.5g, %.1f s", epoch + 1,
                         o.finetune_epochs, steps_per_epoch, bs, losses[-1], epoch_seconds[-1])
    finally:
        for layer in layers.values():
            layer.freeze()
        for p, flag in frozen:
            p.requires_grad_(flag)
    changed = sum(int((layers[n].quantized_weight() != before[n]).sum()) for n in layers)
    total = sum(before[n].numel() for n in layers)
    head = losses[:max(1, steps_per_epoch // 10)] if losses else [math.nan]
    tail = losses[-max(1, steps_per_epoch // 10):] if losses else [math.nan]
    return {"epochs": o.finetune_epochs, "steps": len(losses), "batch_size": bs, "samples": n_samples,
            "lr": o.finetune_lr, "act_lr": o.finetune_act_lr, "loss": "distill (KL to FP logits)",
            "loss_start": sum(head) / len(head), "loss_end": sum(tail) / len(tail),
            "epoch_seconds": [round(s, 2) for s in epoch_seconds],
            "weights_changed": changed / total if total else 0.0,
            "data": "the run's calibration batches (training split), eval mode, no augmentation"}


class OMPQFinetune(qcore.OutputCorrection):
    """``ompq-qat``: QAT fine-tuning of the calibrated model (STE weights, LSQ activation steps, distillation
    from FP) for ``-o finetune_epochs`` epochs; 0 leaves the model as calibrated. The ``ompq`` method selects it,
    so ``qcore run --plugin ompq -o finetune_epochs=N`` fine-tunes."""

    name = "ompq-qat"
    description = ("QAT after calibration: STE weights + LSQ activation steps, distillation from FP, "
                   "-o finetune_epochs=N (0 = none)")
    summary = "none (-o finetune_epochs=0)"
    Options = QATOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        o = self.options
        if o.finetune_epochs:
            self.summary = (f"QAT fine-tuning, {o.finetune_epochs} epoch(s) on the calibration (training-split) "
                            "data: STE weights within one grid step, LSQ activation steps, distillation from FP")

    def correct(self, qmodel: nn.Module, fp_model: nn.Module, ctx: qcore.RunContext) -> None:
        """Fine-tune ``qmodel`` (nothing with ``finetune_epochs=0``); records ``measured.ompq_qat``."""
        if not self.options.finetune_epochs:
            return
        ctx.measured["ompq_qat"] = finetune(qmodel, fp_model, ctx, self.options)
