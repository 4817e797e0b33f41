"""The vision tower as an OpenVINO graph, built op by op from the config with the loaded weights as constants.

Built directly with OpenVINO's opset API rather than traced: ``ov.convert_model`` of the full tower takes minutes
and 12-15 GB of RAM (it traces TorchScript), while this builds it in seconds from the weights already in memory.
The graph follows ``model/tower.py`` op for op:

    pixels (1, S, S, 3) NHWC → patchify + matmul (the stride-P conv) + positions (interpolated for S at build time)
    → L × [x + attn(LN1(x)), x + mlp(LN2(x))] → post LayerNorm → (1, N, D)

LayerNorm is MVN + scale and shift with eps inside the square root, as ``F.layer_norm``; the MLP's GELU is the tanh
form; attention is OpenVINO's ``ScaledDotProductAttention`` op, which the CPU plugin runs as one fused kernel. The
graph is in float32 throughout: the CPU plugin lowers it to bf16 under ``INFERENCE_PRECISION_HINT`` where the CPU has
bf16 units. Weights are constants in their stored dtype (bf16 or fp32) followed by a Convert, the pattern the plugin
folds into its products, so a bf16 checkpoint's IR is half the size of an fp32 one.

Hidden states asked for by index (0 the embeddings, i after layer i) become extra outputs named ``layer{i}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import torch

from ..model.tower import EncoderLayer, VisionTower, interpolate_position_embedding

# Changes whenever the graph this module builds changes: part of the cache key (backends/openvino_cache.py), so an
# upgrade never reuses an IR built by an older builder.
GRAPH_VERSION = 2

Node = Any  # an OpenVINO node output (openvino.Output); the opset API is untyped


def weight(t: torch.Tensor) -> Node:
    """A tensor as a float32 value of the graph: a constant in its stored dtype (bf16 stays bf16, converted in
    the graph), so the IR holds the checkpoint's bytes and nothing is rounded."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        bits = ov.Tensor(ov.Type.bf16, ov.Shape(list(t.shape)))  # numpy has no bf16: its bits are copied in
        bits.data.view(np.int16)[...] = t.view(torch.int16).numpy()
        return ops.convert(ops.constant(bits), ov.Type.f32)
    if t.dtype == torch.float16:
        return ops.convert(ops.constant(t.numpy()), ov.Type.f32)
    return ops.constant(t.float().numpy())


def shape(*dims: int) -> Node:
    return ops.constant(np.array(dims, dtype=np.int64))


def linear(x: Node, w: torch.Tensor, b: torch.Tensor) -> Node:
    """``x @ wᵀ + b``: ``(..., in)`` → ``(..., out)``, w as stored ``(out, in)``."""
    return ops.add(ops.matmul(x, weight(w), transpose_a=False, transpose_b=True), weight(b))


def layer_norm(x: Node, w: torch.Tensor, b: torch.Tensor, eps: float) -> Node:
    """LayerNorm over the last axis, eps inside the square root (as ``F.layer_norm``)."""
    normed = ops.mvn(x, shape(-1), normalize_variance=True, eps=eps, eps_mode="inside_sqrt")
    return ops.add(ops.multiply(normed, weight(w)), weight(b))


def embeddings(pixels: Node, tower: VisionTower, height: int, width: int) -> Node:
    """``(1, H, W, C)`` → ``(1, N, D)``: the patch conv as patchify + one matmul, plus the position table."""
    c = tower.config
    P, C, D = c.patch_size, c.num_channels, c.hidden_size
    gh, gw = height // P, width // P
    if (gh * P, gw * P) != (height, width):  # a valid-padding conv ignores a remainder (SigLIP 384 / 14)
        pixels = ops.slice(pixels, shape(0, 0, 0, 0), shape(1, gh * P, gw * P, C), shape(1, 1, 1, 1))
    patches = ops.reshape(pixels, shape(1, gh, P, gw, P, C), special_zero=False)
    patches = ops.transpose(patches, shape(0, 1, 3, 2, 4, 5))  # (1, gh, gw, P, P, C)
    patches = ops.reshape(patches, shape(1, gh * gw, P * P * C), special_zero=False)  # (1, N, P*P*C)
    conv = tower.embeddings.patch_embedding
    w = conv.weight.permute(0, 2, 3, 1).reshape(D, P * P * C)  # (D, P*P*C), the patches' order
    assert conv.bias is not None  # built with bias=True
    x = linear(patches, w, conv.bias)  # (1, N, D)
    positions = tower.embeddings.position_embedding.weight.float()  # (N0, D)
    if (gh, gw) != (c.grid_size, c.grid_size):
        positions = interpolate_position_embedding(positions, gh, gw)  # (N, D), as the torch tower does it
    return ops.add(x, ops.constant(positions.detach().cpu().contiguous().numpy()))


def split_heads(x: Node, tokens: int, heads: int, head_dim: int) -> Node:
    """``(1, N, H*Dh)`` → ``(1, H, N, Dh)``, the layout ``ScaledDotProductAttention`` takes."""
    return ops.transpose(ops.reshape(x, shape(1, tokens, heads, head_dim), special_zero=False), shape(0, 2, 1, 3))


def encoder_layer(x: Node, layer: EncoderLayer, tokens: int, eps: float) -> Node:
    """``(1, N, D)`` → ``(1, N, D)``: pre-norm attention and MLP blocks with residuals."""
    attn = layer.self_attn
    H, Dh = attn.num_heads, attn.head_dim
    D = H * Dh
    h = layer_norm(x, layer.layer_norm1.weight, layer.layer_norm1.bias, eps)
    # Three products rather than one (1, N, 3D) product and a Split: the CPU plugin runs Split with its reference
    # kernel (3-4 ms a layer at 896 px), and the three products take no longer than the one.
    q, k, v = (split_heads(linear(h, proj.weight, proj.bias), tokens, H, Dh)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))  # (1, H, N, Dh) each
    scale = ops.constant(np.float32(Dh**-0.5))
    out = ops.scaled_dot_product_attention(q, k, v, scale=scale, causal=False)  # (1, H, N, Dh)
    out = ops.reshape(ops.transpose(out, shape(0, 2, 1, 3)), shape(1, tokens, D), special_zero=False)
    x = ops.add(x, linear(out, attn.out_proj.weight, attn.out_proj.bias))
    mlp = layer.mlp
    h = layer_norm(x, layer.layer_norm2.weight, layer.layer_norm2.bias, eps)
    h = ops.gelu(linear(h, mlp.fc1.weight, mlp.fc1.bias), approximation_mode="tanh")  # trained with tanh GELU
    return ops.add(x, linear(h, mlp.fc2.weight, mlp.fc2.bias))


def tower_model(tower: VisionTower, height: int, width: int, layers: Sequence[int] = ()) -> ov.Model:
    """The tower for one input size, batch 1: input ``pixels`` float32 ``(1, H, W, C)``; outputs
    ``last_hidden_state`` ``(1, N, D)`` and ``layer{i}`` for each index in ``layers``, all float32."""
    c = tower.config
    tokens = (height // c.patch_size) * (width // c.patch_size)
    pixels = ops.parameter([1, height, width, c.num_channels], ov.Type.f32, name="pixels")
    x = embeddings(pixels, tower, height, width)
    hidden = {0: x}
    with torch.no_grad():
        for i, layer in enumerate(tower.encoder.layers, start=1):
            x = encoder_layer(x, cast(EncoderLayer, layer), tokens, c.layer_norm_eps)
            hidden[i] = x
    post = tower.post_layernorm
    last = layer_norm(x, post.weight, post.bias, c.layer_norm_eps)
    results = [ops.result(last, name="last_hidden_state")]
    for i in layers:
        results.append(ops.result(hidden[i], name=f"layer{i}"))
    for result, name in zip(results, ["last_hidden_state", *(f"layer{i}" for i in layers)], strict=True):
        result.output(0).get_tensor().set_names({name})
    return ov.Model(results, [pixels], "gemma3_vision_tower")
