"""Knowledge editors (ROME, MEMIT, FT-L, FT-M), optionally restricted by a circuit's parameter mask."""
from .edit import Edit, tensor_hash
from .errors import EditRefused
from .hparams import load_hparams
from .masking import describe_conditions, mask_conditions
from .request import EditRequest, from_record, make_request, read_requests
from .sequence import EditSequence
from .api import edit, editor  # noqa: E402  last: the submodule ``edit`` must not shadow the function

__all__ = ["Edit", "tensor_hash", "EditRequest", "from_record", "make_request", "read_requests", "edit", "editor",
           "EditRefused", "load_hparams", "mask_conditions", "describe_conditions", "EditSequence"]
