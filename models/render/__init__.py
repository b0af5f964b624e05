"""Condition renders (normals, depth, masks) with a CPU rasterizer and a pytorch3d backend."""
from .camera import Camera, portrait_camera
from .conditions import (ConditionMaps, decode_normals, encode_normals, render_conditions,
                         vertex_normals)

__all__ = ["Camera", "portrait_camera", "ConditionMaps", "decode_normals", "encode_normals",
           "render_conditions", "vertex_normals"]
