"""The evaluation harness (``expportrait evaluate``): pixel metrics (torchmetrics), LPIPS from a
local backbone, identity (SFace; dlib second opinion; not ArcFace), AED/APD with our fitter,
temporal jitter, identity drift; the copy-reference baseline; an HTML report.

- :mod:`.metrics` PSNR/SSIM/L1, jitter, drift   - :mod:`.identity` SFace / dlib embeddings
- :mod:`.lpips` LPIPS-AlexNet, local weights     - :mod:`.motion` AED / APD by fitting
- :mod:`.harness` pairs, runs, summaries         - :mod:`.report` the HTML page and plots
"""
from .metrics import PSNR_CAP_DB, identity_drift, pixel_metrics, temporal_jitter

__all__ = ["PSNR_CAP_DB", "identity_drift", "pixel_metrics", "temporal_jitter"]
