"""Record, patch, ablate and steer components during a forward pass. Every intervention is a
context manager whose hooks are removed on exit, exceptions included."""
from .ablate import ablate, mean_activations
from .attention import record_attention
from .hookset import HookSet, hook_count, idle_hooks
from .neurons import keep_neurons, neuron_writes, steer_neurons
from .patch import patch
from .record import Recording, record
from .replace import replace_activations
from .steer import even_over, steer_attention

__all__ = ["ablate", "mean_activations", "record_attention", "HookSet", "hook_count", "idle_hooks",
           "keep_neurons", "neuron_writes", "steer_neurons", "patch", "Recording", "record", "replace_activations", "even_over", "steer_attention"]
