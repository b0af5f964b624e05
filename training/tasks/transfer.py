"""LightningModule of the expression transfer module (the model itself: models/transfer).

Each sample is a segment of one identity's clip: its (ψ, jaw) per frame, its β and Δg, and
its Δf (fitted by the preprocessing job, or exact in the synthetic world's truth shards). The
module predicts Δf from (ψ, jaw) and the identity's neutral mesh; the loss is the mean squared
error in mm² of frame-centred Δf (fitted Δf is zero-mean over a clip, so only the centred
part is data; the module's zero-at-neutral anchor fixes the level). A step uses every face
vertex by default (``vertex_samples``: a random subset instead, an unbiased sample since 𝓖 is
per vertex); the per-vertex basis learns at ``basis_lr_scale`` × the learning rate.
"""
from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import Tensor

from models.head.head_model import PersonalizedHead
from models.transfer.inputs import canonical_face, neutral_inputs
from models.transfer.module import ExpressionTransfer
from training.tasks.reader_skips import ReaderSkipsMixin


def build_head(head_model: str | None, subdivision: int) -> PersonalizedHead:
    """The head model the shards were made with (None: ``$EXPPORTRAIT_SMPLX_PATH``, else the cached
    synthetic model; :func:`models.head.resolve.head_model_path`)."""
    from models.head.resolve import head_model_path
    return PersonalizedHead.from_file(head_model_path(head_model), subdivision_levels=subdivision)


def centred_mse_mm(pred: Tensor, target: Tensor) -> Tensor:
    """MSE in mm² of Δf (B, T, S, 3) after removing each sample's mean over frames."""
    d = (pred - pred.mean(1, keepdim=True)) - (target - target.mean(1, keepdim=True))
    return (d * 1000.0).square().mean()


def relative_error(pred: Tensor, target: Tensor) -> Tensor:
    """‖Δf_pred − Δf‖ / ‖Δf‖ over the batch, both frame-centred."""
    p, t = pred - pred.mean(1, keepdim=True), target - target.mean(1, keepdim=True)
    return (p - t).norm() / t.norm().clamp(min=1e-12)


class TransferTask(ReaderSkipsMixin, pl.LightningModule):
    """Trains :class:`ExpressionTransfer` of flavor ``flavor`` on shards."""

    def __init__(self, flavor: str = "tiny_cpu", head_model: str | None = None, subdivision: int = 1,
                 lr: float = 3e-3, weight_decay: float = 0.05, warmup_steps: int = 20,
                 vertex_samples: int | None = None, basis_lr_scale: float = 3.0,
                 laplacian_weight: float = 0.0, jaw_scale: float = 1.0, expression_noise: float = 0.0,
                 seed: int = 0) -> None:
        """``jaw_scale``: the jaw angle's factor at the encoder's input (saved with the module);
        ``expression_noise``: std of Gaussian noise added to the driver's ψ in training steps
        (an augmentation against an encoder that recognises clips by their ψ)."""
        super().__init__()
        self.save_hyperparameters()
        head = build_head(head_model, subdivision)
        self._head = [head]                     # kept out of the module tree: not trained, not saved
        self.model = ExpressionTransfer(num_face_vertices=head.num_face_vertices, flavor=flavor,
                                        jaw_scale=jaw_scale)
        self.model.set_canonical(canonical_face(head))
        self._checked_ids = False
        self._face_laplacian: Tensor | None = None
        self._reset_reader_skips()

    @property
    def head(self) -> PersonalizedHead:
        return self._head[0]

    def setup(self, stage: str) -> None:
        self._head[0] = self.head.to(self.device)

    # -- inputs -----------------------------------------------------------------------------
    def inputs(self, batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(ψ, jaw, V_neutral, Δg) of a batch, float32, face region."""
        if not self._checked_ids:
            ids = batch["face_vertex_ids"][0].to(self.head.face_vertex_ids)
            if not torch.equal(ids, self.head.face_vertex_ids):
                raise ValueError("the shards' face_vertex_ids differ from the head model's: train with "
                                 "the head model (head_model, subdivision) the shards were made with")
            self._checked_ids = True
        sm = batch["smplx"]
        neutral, static = neutral_inputs(self.head, sm["betas"].float(), batch["static_offsets"].float())
        return sm["expression"].float(), sm["jaw_pose"].float(), neutral, static

    def vertex_subset(self) -> Tensor | None:
        """Face vertices of this step (None: all): a function of (seed, step, rank), so a
        resumed run draws what the uninterrupted one would have."""
        n = self.model.num_face_vertices
        if self.hparams.vertex_samples is None or self.hparams.vertex_samples >= n:
            return None
        g = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.global_step * 101 + self.global_rank)
        return torch.randperm(n, generator=g)[:min(self.hparams.vertex_samples, n)].to(self.device)

    # -- steps ------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        expr, jaw, neutral, static = self.inputs(batch)
        if self.hparams.expression_noise > 0:          # a function of (seed, step, rank), as below
            g = torch.Generator().manual_seed(self.hparams.seed * 999_983 + self.global_step * 7 + self.global_rank)
            expr = expr + self.hparams.expression_noise * torch.randn(expr.shape, generator=g).to(expr)
        ids = self.vertex_subset()
        pred = self.model(expr, jaw, neutral, static, ids)
        target = batch["dynamic_offsets"] if ids is None else batch["dynamic_offsets"][:, :, ids]
        loss = centred_mse_mm(pred.float(), target.float())
        if self.hparams.laplacian_weight > 0 and ids is None:
            lap = self.laplacian_mse_mm(pred.float(), target.float())
            self.log("train/laplacian_mm2", lap, batch_size=expr.shape[0])
            loss = loss + self.hparams.laplacian_weight * lap
        bs = expr.shape[0]
        self.log("train/loss_mm2", loss, prog_bar=True, batch_size=bs)
        self.log_reader_skips(batch, bs)                   # summed over workers, epochs, ranks
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        expr, jaw, neutral, static = self.inputs(batch)
        pred = self.model(expr, jaw, neutral, static).float()
        target = batch["dynamic_offsets"].float()
        bs = expr.shape[0]
        self.log("val/loss_mm2", centred_mse_mm(pred, target), prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/rel_err", relative_error(pred, target), batch_size=bs, sync_dist=True)
        self.log("val/rel_err_zero", relative_error(torch.zeros_like(target), target), batch_size=bs,
                 sync_dist=True)

    def laplacian_mse_mm(self, pred: Tensor, target: Tensor) -> Tensor:
        """MSE (mm²) of the uniform Laplacian of the frame-centred Δf error over the face
        region: weighs fine detail (what normal maps show) beside the deep folds."""
        if self._face_laplacian is None:
            ids = self.head.face_vertex_ids.cpu()
            lap = self.head.laplacian().cpu().index_select(0, ids).index_select(1, ids).coalesce()
            self._face_laplacian = lap.to(pred.device)
        d = (pred - pred.mean(1, keepdim=True)) - (target - target.mean(1, keepdim=True))   # (B, T, N, 3)
        b, t, n, _ = d.shape
        ld = torch.sparse.mm(self._face_laplacian, d.permute(2, 0, 1, 3).reshape(n, -1))
        return (ld * 1000.0).square().mean()

    def configure_optimizers(self):
        basis = [p for n, p in self.model.named_parameters() if n == "vertex_basis"]
        rest = [p for n, p in self.model.named_parameters() if n != "vertex_basis"]
        groups = [{"params": rest}] + ([{"params": basis, "lr": self.hparams.lr * self.hparams.basis_lr_scale}]
                                       if basis else [])
        opt = torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = min(self.hparams.warmup_steps, total // 2)

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm)))) * 0.95 + 0.05

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- export -----------------------------------------------------------------------------
    def export_module(self) -> ExpressionTransfer:
        """The module that is exported (safetensors + config) with the EMA weights."""
        return self.model
