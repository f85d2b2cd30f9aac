"""The operators a TorchScript expert may use: tensor arithmetic and the interpreter's own
control flow, nothing that reads or writes files, prints, spawns work or changes what is
outside the module's own tensors.

The list started from every operator of torchvision's classification models, scripted and
traced (``SEEN``), and adds operators of the same kind that other vision models use, timm's
among them (``ALSO_PURE``, ``RESAMPLING``). It is an allow-list: an operator missing here is
refused by name, and adding one means reading what it does. Left out on purpose, among
others: ``aten::from_file`` (opens and maps a file), ``aten::save``, ``prim::Print``,
``prim::fork`` and ``aten::wait``, ``prim::SetAttr`` (changes the module between calls), and
every call left after inlining (``prim::CallMethod``, ``prim::CallFunction``: code the walk
could not see).

Two kept because the models need them: ``aten::empty`` (uninitialised memory, which stochastic
depth fills at once) and ``aten::warn`` (a warning in the log; GoogLeNet and Inception).
"""

from __future__ import annotations


def _named(namespace: str, names: str) -> frozenset[str]:
    return frozenset(f"{namespace}::{name}" for name in names.split())


#: Seen in torchvision's classification models, scripted and traced.
SEEN: frozenset[str] = frozenset().union(
    _named(
        "aten",
        "Float Int __and__ __contains__ __getitem__ __is__ __isnot__ __not__ _convolution "
        "_native_multi_head_attention _set_item adaptive_avg_pool2d add add_ all any append "
        "avg_pool2d baddbmm batch_norm bernoulli_ bmm cat chunk clamp clamp_min clone contiguous "
        "conv2d copy copy_ dim div div_ dropout dropout_ einsum empty eq exp expand expand_as "
        "fill_ flatten floor_divide floordiv format ge gelu gt hardsigmoid hardsigmoid_ hardswish "
        "hardswish_ hardtanh hardtanh_ index is_autocast_enabled is_floating_point "
        "is_grad_enabled layer_norm le len linalg_vector_norm linear lt masked_fill masked_fill_ "
        "matmul max_pool2d mean mul ne neg new_zeros norm numel pad permute pow relu relu_ "
        "remainder repeat reshape roll rsub scaled_dot_product_attention select sigmoid silu "
        "silu_ size slice softmax split sqrt squeeze sub sum tanh tensor transpose unflatten "
        "unsqueeze view warn zero_ zeros zeros_like",
    ),
    _named(
        "prim",
        "Constant GetAttr If ListConstruct ListUnpack Loop NumToTensor RaiseException "
        "TupleConstruct TupleIndex TupleUnpack Uninitialized device dtype is_nested requires_grad "
        "type unchecked_cast",
    ),
)

#: More of the same kind: elementwise math, reductions, pooling, padding, resampling,
#: normalisation, shapes, indexing, and the scalar and container operators of TorchScript.
ALSO_PURE: frozenset[str] = frozenset().union(
    _named(
        "aten",
        "Bool FloatImplicit IntImplicit ScalarImplicit __derive_index __lshift__ __or__ "
        "__range_length __round_to_zero_floordiv __rshift__ __xor__ abs abs_ acos "
        "adaptive_avg_pool1d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d "
        "adaptive_max_pool3d addcdiv addcmul addmm alias amax amin arange argmax argmin asin atan "
        "atan2 avg_pool1d avg_pool3d bitwise_not broadcast_tensors cdist ceil celu "
        "channel_shuffle clamp_ clamp_max clamp_max_ clamp_min_ constant_pad_nd conv1d conv3d "
        "conv_transpose1d conv_transpose2d conv_transpose3d cos cosh cosine_similarity cumprod "
        "cumsum detach detach_ diag dict dot elu elu_ embedding empty_like eq_ erf exp2 exp_ "
        "expm1 flip floor floor_ floor_divide_ fmod frac frobenius_norm full full_like gather gcd "
        "ge_ gelu_ glu group_norm gt_ hardshrink index_put index_put_ index_select instance_norm "
        "is_contiguous is_nonzero item keys le_ leaky_relu leaky_relu_ lerp linspace list log "
        "log10 log1p log2 log_softmax logical_and logical_not logical_or logit logsumexp lt_ max "
        "max_pool1d max_pool3d maximum min minimum mish mm mul_ narrow native_layer_norm neg_ "
        "new_full new_ones norm_except_dim ones ones_like outer pairwise_distance pixel_shuffle "
        "pixel_unshuffle prelu prod reciprocal reflection_pad1d reflection_pad2d relu6 "
        "repeat_interleave replication_pad1d replication_pad2d round rsqrt scatter scatter_add "
        "selu sigmoid_ sign sin sinh softplus softshrink sort split_with_sizes sqrt_ square "
        "square_ stack std std_mean str sub_ t tan tanh_ threshold threshold_ to topk tril triu "
        "trunc type_as unbind unsafe_chunk unsafe_split upsample_bicubic2d upsample_bilinear2d "
        "upsample_nearest2d values var var_mean where",
    ),
    _named(
        "prim",
        "AutogradZero DictConstruct EnumName EnumValue ListIndex TupleSlice abs isinstance layout "
        "max min tolist",
    ),
)

#: Resampling as ``F.interpolate`` compiles it (every mode is in its graph) and the shape
#: helpers of timm's models (LeViT, MobileViT).
RESAMPLING: frozenset[str] = _named(
    "aten",
    "_upsample_bicubic2d_aa _upsample_bilinear2d_aa _upsample_lanczos2d_aa "
    "_upsample_nearest_exact1d _upsample_nearest_exact2d _upsample_nearest_exact3d "
    "upsample_linear1d upsample_nearest1d upsample_nearest3d upsample_trilinear3d "
    "reshape_as view_as",
)

PURE_OPERATORS: frozenset[str] = SEEN | ALSO_PURE | RESAMPLING
