"""Neural-network ONNX ops: Gemm, Conv/ConvTranspose, pooling, normalisations, Dropout, losses."""
from __future__ import annotations

from . import FLOAT, FLOAT_BF, NUMERIC, lowers
from .elementwise import const


def _opt(lw, node, i):
    return lw.get(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else None


@lowers("Gemm", dtypes=FLOAT_BF)
def gemm(lw, node):
    from .dense import accumulating_matmul
    op = lw.relax.op
    a, b, c = lw.get(node.inputs[0]), lw.get(node.inputs[1]), _opt(lw, node, 2)
    dtype = a.ty.dtype                # (a permuted below is an unnormalised call, without a type yet)
    if node.attrs.get("transA", 0):
        a = op.permute_dims(a, [1, 0])
    if node.attrs.get("transB", 0):
        b = op.permute_dims(b, [1, 0])
    y = accumulating_matmul(lw, a, b, dtype)
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    if alpha != 1.0:
        y = lw.emit(op.multiply(y, const(lw, alpha, y)))
    if c is not None:
        y = lw.emit(op.add(y, c if beta == 1.0 else op.multiply(c, const(lw, beta, c))))
    return y


# ---- windows: Conv, ConvTranspose, pooling --------------------------------------------------------
def _static_dims(lw, node, x, what):
    dims = [lw.as_int(d) for d in lw.shape(x)]
    if any(d is None for d in dims):
        raise lw.unsupported(node, f"its {what} needs static spatial dims")
    return dims


def _window(lw, node, x, kernel, *, ceil_mode=False):
    """(strides, dilations, pads) for a window op; pads begins then ends, resolved from auto_pad."""
    n = len(kernel)
    a = node.attrs
    strides = list(a.get("strides") or [1] * n)
    dil = list(a.get("dilations") or [1] * n)
    auto = a.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        spatial = _static_dims(lw, node, x, "auto_pad")[2:]
        begins, ends = [], []
        for i in range(n):
            out = -(-spatial[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - spatial[i])
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)
            ends.append(big if auto == "SAME_UPPER" else small)
        pads = begins + ends
    elif auto == "VALID":
        pads = [0] * (2 * n)
    else:
        pads = list(a.get("pads") or [0] * (2 * n))
    return strides, dil, pads


_LAYOUT = {1: ("NCW", "OIW"), 2: ("NCHW", "OIHW"), 3: ("NCDHW", "OIDHW")}


def _kernel_shape(lw, node, w):
    ks = node.attrs.get("kernel_shape")
    return list(ks) if ks else [lw.as_int(d) for d in lw.shape(w)[2:]]


def _nd(lw, node, fn_name, n, suffix=""):
    if n not in _LAYOUT:
        raise lw.unsupported(node, f"{n}-D windows (1-D to 3-D only)")
    return getattr(lw.relax.op.nn, f"{fn_name}{n}d{suffix}")


@lowers("Conv", dtypes=FLOAT)
def conv(lw, node):
    op = lw.relax.op
    x, w, b = lw.get(node.inputs[0]), lw.get(node.inputs[1]), _opt(lw, node, 2)
    kernel = _kernel_shape(lw, node, w)
    n = len(kernel)
    strides, dil, pads = _window(lw, node, x, kernel)
    data_layout, kernel_layout = _LAYOUT.get(n, (None, None))
    fn = _nd(lw, node, "conv", n)
    y = lw.emit(fn(x, w, strides, pads, dil, int(node.attrs.get("group", 1)), data_layout, kernel_layout))
    return lw.emit(op.add(y, op.reshape(b, [1, -1] + [1] * n))) if b is not None else y


@lowers("ConvTranspose", dtypes=FLOAT)
def conv_transpose(lw, node):
    op = lw.relax.op
    a = node.attrs
    x, w, b = lw.get(node.inputs[0]), lw.get(node.inputs[1]), _opt(lw, node, 2)
    kernel = _kernel_shape(lw, node, w)
    n = len(kernel)
    strides = list(a.get("strides") or [1] * n)
    dil = list(a.get("dilations") or [1] * n)
    out_pad = list(a.get("output_padding") or [0] * n)
    auto = a.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if a.get("output_shape") or auto in ("SAME_UPPER", "SAME_LOWER"):
        spatial = _static_dims(lw, node, x, "output_shape / auto_pad")[2:]
        target = list(a["output_shape"])[-n:] if a.get("output_shape") else [s * st for s, st in zip(spatial, strides)]
        begins, ends = [], []
        for i in range(n):
            total = strides[i] * (spatial[i] - 1) + out_pad[i] + (kernel[i] - 1) * dil[i] + 1 - target[i]
            if total < 0:        # the output is longer than the full convolution: pad the end
                out_pad[i] -= total
                total = 0
            small, big = total // 2, total - total // 2
            upper = auto == "SAME_UPPER"
            begins.append(small if upper else big)
            ends.append(big if upper else small)
        pads = begins + ends
    elif auto == "VALID":
        pads = [0] * (2 * n)
    else:
        pads = list(a.get("pads") or [0] * (2 * n))
    data_layout, kernel_layout = _LAYOUT.get(n, (None, None))
    fn = _nd(lw, node, "conv", n, "_transpose")
    y = lw.emit(fn(x, w, strides, pads, out_pad, dil, int(a.get("group", 1)), data_layout,
                   kernel_layout.replace("OI", "IO")))
    return lw.emit(op.add(y, op.reshape(b, [1, -1] + [1] * n))) if b is not None else y


@lowers("MaxPool", "AveragePool", dtypes=NUMERIC)
def pool(lw, node):
    ind = node.outputs[1] if len(node.outputs) > 1 else None
    if ind is not None and (ind.uses or ind.is_graph_output):
        raise lw.unsupported(node, "the Indices output")
    if node.op_type == "AveragePool" and str(node.inputs[0].dtype) not in FLOAT:
        raise lw.unsupported(node, f"dtype {node.inputs[0].dtype} is not supported (AveragePool: float only)")
    x = lw.get(node.inputs[0])
    kernel = list(node.attrs["kernel_shape"])
    n = len(kernel)
    strides, dil, pads = _window(lw, node, x, kernel)
    ceil = bool(node.attrs.get("ceil_mode", 0))
    if node.op_type == "MaxPool":
        fn = _nd(lw, node, "max_pool", n)
        return lw.emit(fn(x, kernel, strides, pads, dil, ceil, False, _LAYOUT[n][0]))
    if any(d != 1 for d in dil):
        raise lw.unsupported(node, "dilated AveragePool")
    fn = _nd(lw, node, "avg_pool", n)
    return lw.emit(fn(x, kernel, strides, pads, dil, ceil, bool(node.attrs.get("count_include_pad", 0)),
                      _LAYOUT[n][0]))


@lowers("GlobalAveragePool", "GlobalMaxPool", dtypes=FLOAT)
def global_pool(lw, node):
    op = lw.relax.op
    x = lw.get(node.inputs[0])
    axes = list(range(2, len(lw.shape(x))))
    fn = op.mean if node.op_type == "GlobalAveragePool" else op.max
    return lw.emit(fn(x, axes, keepdims=True))


# ---- normalisations --------------------------------------------------------------------------------
def _per_channel(lw, v, rank):
    return lw.relax.op.reshape(lw.bb.normalize(v), [1, -1] + [1] * (rank - 2))


@lowers("BatchNormalization", dtypes=FLOAT)
def batch_norm(lw, node):
    if node.attrs.get("training_mode", 0) or len([o for o in node.outputs if o is not None]) > 1:
        raise lw.unsupported(node, "training mode (running statistics outputs)")
    op = lw.relax.op
    x, scale, bias, mean, var = (lw.get(v) for v in node.inputs[:5])
    r = len(lw.shape(x))
    inv = op.rsqrt(op.add(var, const(lw, float(node.attrs.get("epsilon", 1e-5)), var)))
    y = op.multiply(op.subtract(x, _per_channel(lw, mean, r)), _per_channel(lw, op.multiply(inv, scale), r))
    return lw.emit(op.add(y, _per_channel(lw, bias, r)))


def _normalise(lw, x, axes, eps):
    """(x - mean) / sqrt(var + eps) over `axes`, and the mean and 1/std (keepdims)."""
    op = lw.relax.op
    mean = lw.emit(op.mean(x, axes, keepdims=True))
    d = lw.emit(op.subtract(x, mean))
    inv = lw.emit(op.rsqrt(op.add(op.mean(op.square(d), axes, keepdims=True), const(lw, eps, x))))
    return lw.emit(op.multiply(d, inv)), mean, inv


@lowers("InstanceNormalization", dtypes=FLOAT)
def instance_norm(lw, node):
    op = lw.relax.op
    x, scale, bias = (lw.get(v) for v in node.inputs[:3])
    r = len(lw.shape(x))
    y, _, _ = _normalise(lw, x, list(range(2, r)), float(node.attrs.get("epsilon", 1e-5)))
    return lw.emit(op.add(op.multiply(y, _per_channel(lw, scale, r)), _per_channel(lw, bias, r)))


@lowers("LayerNormalization", dtypes=FLOAT)
def layer_norm(lw, node):
    op = lw.relax.op
    x, scale, bias = lw.get(node.inputs[0]), lw.get(node.inputs[1]), _opt(lw, node, 2)
    r = len(lw.shape(x))
    axis = node.attrs.get("axis", -1) % r
    stash = node.attrs.get("stash_type", 1)
    xs = x if stash != 1 or x.ty.dtype == "float32" else lw.emit(op.astype(x, "float32"))
    y, mean, inv = _normalise(lw, xs, list(range(axis, r)), float(node.attrs.get("epsilon", 1e-5)))
    if xs is not x:
        y = lw.emit(op.astype(y, x.ty.dtype))
    y = lw.emit(op.multiply(y, scale))
    if bias is not None:
        y = lw.emit(op.add(y, bias))
    return [y, mean, inv]


@lowers("GroupNormalization", dtypes=FLOAT)
def group_norm(lw, node):
    op = lw.relax.op
    x, scale, bias = (lw.get(v) for v in node.inputs[:3])
    shape = lw.shape(x)
    r = len(shape)
    groups = int(node.attrs["num_groups"])
    if lw.graph.opset_imports.get("", 21) < 21:
        raise lw.unsupported(node, "GroupNormalization-18 (per-group scale and bias)")
    g = lw.emit(op.reshape(x, [shape[0], groups, -1]))
    y, _, _ = _normalise(lw, g, [2], float(node.attrs.get("epsilon", 1e-5)))
    y = lw.emit(op.reshape(y, shape))
    return lw.emit(op.add(op.multiply(y, _per_channel(lw, scale, r)), _per_channel(lw, bias, r)))


@lowers("RMSNormalization", dtypes=FLOAT)
def rms_norm(lw, node):
    op = lw.relax.op
    x, scale = lw.get(node.inputs[0]), lw.get(node.inputs[1])
    r = len(lw.shape(x))
    axes = list(range(node.attrs.get("axis", -1) % r, r))
    xs = x if x.ty.dtype == "float32" or node.attrs.get("stash_type", 1) != 1 else lw.emit(op.astype(x, "float32"))
    inv = op.rsqrt(op.add(op.mean(op.square(xs), axes, keepdims=True),
                          const(lw, float(node.attrs.get("epsilon", 1e-5)), xs)))
    y = lw.emit(op.multiply(xs, inv))
    if xs is not x:
        y = lw.emit(op.astype(y, x.ty.dtype))
    return lw.emit(op.multiply(y, scale))


@lowers("LpNormalization", dtypes=FLOAT)
def lp_norm(lw, node):
    op = lw.relax.op
    x = lw.get(node.inputs[0])
    axis, p = node.attrs.get("axis", -1), node.attrs.get("p", 2)
    if p == 1:
        norm = op.sum(op.abs(x), [axis], keepdims=True)
    elif p == 2:
        norm = op.sqrt(op.sum(op.square(x), [axis], keepdims=True))
    else:
        raise lw.unsupported(node, f"p={p}")
    norm = lw.emit(norm)
    zero = op.equal(norm, op.zeros_like(norm))
    return lw.emit(op.where(zero, op.zeros_like(x), op.divide(x, norm)))


@lowers("MeanVarianceNormalization", dtypes=FLOAT)
def mvn(lw, node):
    x = lw.get(node.inputs[0])
    y, _, _ = _normalise(lw, x, list(node.attrs.get("axes", [0, 2, 3])), 1e-9)
    return y


@lowers("Dropout", dtypes=FLOAT)
def dropout(lw, node):
    """Inference: the identity (training_mode must be a known false), and an all-true mask."""
    training = lw.known(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if len(node.inputs) > 2 and node.inputs[2] is not None and (training is None or bool(training.reshape(-1)[0])):
        raise lw.unsupported(node, "training_mode (random dropout)")
    x = lw.get(node.inputs[0])
    mask = lw.emit(lw.relax.op.ones(lw.shape(x), "bool")) if len(node.outputs) > 1 else None
    return [x, mask]


# ---- losses ----------------------------------------------------------------------------------------
def _reduction(node):
    r = node.attrs.get("reduction", "mean")
    return r.decode() if isinstance(r, bytes) else r


def _nll(lw, node, logp, target, weight):
    ignore = node.attrs.get("ignore_index")
    return lw.emit(lw.relax.op.nn.nll_loss(logp, target, weight, _reduction(node),
                                           -100 if ignore is None else int(ignore)))


@lowers("NegativeLogLikelihoodLoss", dtypes=FLOAT)
def nll_loss(lw, node):
    return _nll(lw, node, lw.get(node.inputs[0]), lw.get(node.inputs[1]), _opt(lw, node, 2))


@lowers("SoftmaxCrossEntropyLoss", dtypes=FLOAT)
def softmax_cross_entropy(lw, node):
    logp = lw.emit(lw.relax.op.nn.log_softmax(lw.get(node.inputs[0]), 1))
    return [_nll(lw, node, logp, lw.get(node.inputs[1]), _opt(lw, node, 2)), logp]


# ---- Resize ----------------------------------------------------------------------------------------
def _const_floats(lw, node, i):
    v = node.inputs[i] if len(node.inputs) > i else None
    if v is None:
        return None
    if not v.is_constant:
        raise lw.unsupported(node, f"its {v.name} input must be a constant")
    return [float(f) for f in v.const.reshape(-1)]


def _text(node, name, default):
    v = node.attrs.get(name, default)
    return v.decode() if isinstance(v, bytes) else v


@lowers("Resize", dtypes=FLOAT)
def resize(lw, node):
    """4-D NCHW, spatial dims only, through relax.image.resize2d (which maps coordinates by out/in)."""
    x = lw.get(node.inputs[0])
    dims = _static_dims(lw, node, x, "Resize")
    if len(dims) != 4 or node.attrs.get("antialias", 0) \
            or _text(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        raise lw.unsupported(node, "only 4-D inputs resized on H and W (no antialias or aspect policy)")
    axes = [a % 4 for a in node.attrs.get("axes") or range(4)]
    sizes, scales = _const_floats(lw, node, 3), _const_floats(lw, node, 2)
    if sizes:           # per listed axis -> per dim (unlisted dims keep their size)
        sizes = [sizes[axes.index(i)] if i in axes else d for i, d in enumerate(dims)]
    if scales:
        scales = [scales[axes.index(i)] if i in axes else 1.0 for i in range(4)]
    if sizes:
        out = [int(s) for s in sizes]
    elif scales:
        out = [int(d * s) for d, s in zip(dims, scales)]
        # resize2d derives its scale from the sizes: only exact ones give ONNX's coordinates
        if any(abs(d * s - o) > 1e-6 for d, s, o in zip(dims, scales, out)):
            raise lw.unsupported(node, f"scales {scales} do not give whole output sizes")
    else:
        raise lw.unsupported(node, "neither scales nor sizes given")
    if out[:2] != dims[:2]:
        raise lw.unsupported(node, "resizing the batch or channel dim")
    coord = _text(node, "coordinate_transformation_mode", "half_pixel")
    roi = _const_floats(lw, node, 1) if coord == "tf_crop_and_resize" else None
    if roi:             # [starts..., ends...] over the listed axes -> (start_h, start_w, end_h, end_w)
        k = len(axes)
        lo, hi = dict(zip(axes, roi[:k])), dict(zip(axes, roi[k:]))
        roi = (lo.get(2, 0.0), lo.get(3, 0.0), hi.get(2, 1.0), hi.get(3, 1.0))
    else:
        roi = (0.0, 0.0, 0.0, 0.0)
    method = {"nearest": "nearest_neighbor", "linear": "linear", "cubic": "cubic"}[_text(node, "mode", "nearest")]
    rounding = _text(node, "nearest_mode", "round_prefer_floor") if method == "nearest_neighbor" else ""
    return lw.emit(lw.relax.op.image.resize2d(
        x, out[2:], roi, "NCHW", method, coord, rounding, float(node.attrs.get("cubic_coeff_a", -0.75)),
        int(node.attrs.get("exclude_outside", 0)), float(node.attrs.get("extrapolation_value", 0.0))))


@lowers("LRN", dtypes=FLOAT)
def lrn(lw, node):
    """x / (bias + alpha / size * sum of x^2 over a channel window) ^ beta; the windowed mean of x^2 is an
    average pool over channels (zero-padded, padding counted: the sum over the window divided by size)."""
    op = lw.relax.op
    x = lw.get(node.inputs[0])
    shape = lw.shape(x)
    size = int(node.attrs["size"])
    sq = lw.emit(op.reshape(lw.emit(op.square(x)), [shape[0], 1, shape[1], -1]))
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    pooled = lw.emit(op.nn.avg_pool2d(sq, (size, 1), (1, 1), (lo, 0, hi, 0), count_include_pad=True))
    mean = lw.emit(op.reshape(pooled, shape))
    a, b, k = (float(node.attrs.get(n, d)) for n, d in (("alpha", 1e-4), ("beta", 0.75), ("bias", 1.0)))
    den = op.power(op.add(op.multiply(mean, const(lw, a, x)), const(lw, k, x)), const(lw, b, x))
    return lw.emit(op.divide(x, den))
