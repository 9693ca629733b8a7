"""Per-sample gradient samplers, one per layer type, plus a generic one (docs/HARMONIZER.md "5. Layer types and
registering a sampler").

Registered: nn.Linear, nn.Conv1d/2d/3d, nn.LayerNorm, nn.Embedding, harmony.model.layers.AddEmbedding and
PrependToken. Any other module with direct parameters gets the generic sampler (vmap of its VJP per
sample); BatchNorm (any _BatchNorm, SyncBatchNorm) mixes samples and raises an error naming the module.
Register your own with ``@register_grad_sampler(MyModule)`` on a ``GradSampler`` subclass.
"""
from torch import nn

from harmony.method.grad_sample.base import Call, GradSampler, PerSampleError
from harmony.method.grad_sample.registry import find_sampler, register_grad_sampler, register_sample_mixing
from harmony.method.grad_sample import conv, direct, embedding, layer_norm, linear  # noqa: F401  (register samplers)
from harmony.method.grad_sample.generic import GENERIC, GenericSampler

register_sample_mixing(nn.modules.batchnorm._BatchNorm, "it normalises with statistics over the whole batch")

__all__ = ["Call", "GradSampler", "GenericSampler", "PerSampleError", "find_sampler", "register_grad_sampler",
           "register_sample_mixing", "GENERIC"]
