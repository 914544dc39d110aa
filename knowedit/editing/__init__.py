"""Knowledge editors (ROME, MEMIT, FT-L, FT-M), optionally restricted by a circuit's parameter mask."""
from .edit import Edit, tensor_hash
from .request import EditRequest, from_record, make_request, read_requests

__all__ = ["Edit", "tensor_hash", "EditRequest", "from_record", "make_request", "read_requests"]
