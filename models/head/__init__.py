"""Head representation: SMPL-X-format model files, the synthetic model, the personalized head."""
from .head_model import (HeadConfig, HeadOutput, HeadParams, PersonalizedHead,
                         center_dynamic_offsets)
from .smplx_file import (HeadModelFileError, SMPLXModelData, load_smplx_model,
                         resolve_model_path, save_smplx_model)

__all__ = ["HeadConfig", "HeadOutput", "HeadParams", "PersonalizedHead", "center_dynamic_offsets",
           "HeadModelFileError", "SMPLXModelData", "load_smplx_model", "resolve_model_path",
           "save_smplx_model"]
