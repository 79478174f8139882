"""Vec2Face as a library: the models, identity sampling, AttrOP and the pipeline.

Importing this package imports every pipeline component's module, which diffusers needs in order to
resolve them in ``Vec2FacePipeline.from_pretrained`` (it never imports modules named by a repo).
"""

from .align import NoFaceFoundError, align_face
from .attrop import AttrOPConfig, AttrOPResult, attrop
from .errors import HSFaceError, HubUnreachableError, InvalidInputError
from .weights import WeightsLoadError, load_state_dict_strict, read_weights
from .identity import IdentityPrior, perturb, sample_identities
from .models.discriminator import PatchDiscriminator
from .models.generator import Vec2Face, Vec2FaceOutput, vec2face_vit_base_patch16
from .models.iresnet import IResNet, iresnet18, iresnet34, iresnet50, iresnet100, iresnet200, magface_quality, se_iresnet50
from .models.sixdrepnet import SixDRepNet
from .pipeline_vec2face import AttrOPSchedule, Vec2FacePipeline, Vec2FacePipelineOutput

__all__ = [
    "AttrOPConfig", "AttrOPResult", "AttrOPSchedule", "HSFaceError", "HubUnreachableError", "InvalidInputError", "IResNet", "IdentityPrior", "NoFaceFoundError", "PatchDiscriminator",
    "SixDRepNet", "Vec2Face", "Vec2FaceOutput", "Vec2FacePipeline", "Vec2FacePipelineOutput",
    "WeightsLoadError", "align_face", "attrop", "iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200",
    "load_state_dict_strict", "magface_quality", "perturb", "read_weights", "sample_identities",
    "se_iresnet50", "vec2face_vit_base_patch16",
]
