"""The audio codec's encoder for inference on the CPU: `Encoder.forward` computed as matrix products
over channels-last buffers. `AudioTokenizer.encode` uses it for CPU tensors; training and other
devices run the module itself.

Why: PyTorch runs CPU convolutions through oneDNN, which builds a primitive for every new input
length, about 7 ms for the encoder's convolutions (more than half of a 3 s clip's encode), and
`prepare` meets a new length at almost every clip. Here nothing is set up per length, and nothing
is copied for padding or windows:

- every layer's input is written once, activated, into a [T, C] buffer with zero margins for the
  convolution's padding;
- a stride-1 convolution with kernel k and dilation d is one product per tap over shifted rows,
  out = bias + sum_j buf[j·d : j·d + T] @ W_j;
- a strided one with kernel m·s reads the buffer as frames of s samples, [frames, s·C], so
  out[t] = bias + sum_j frames[t + j] @ W_j (the encoder's have m = 2).

The result equals the module's up to float rounding and the codes agree (tests); the speed figures
are in docs/results.md ("Prepare throughput: the codec encoder without oneDNN").
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .audio import ELU, Encoder, ResUnit, elu_into


def _activate_into(act: nn.Module | None, x: torch.Tensor, out: torch.Tensor) -> None:
    """out = act(x) (x itself when act is None); both contiguous [T, C]."""
    if act is None:
        out.copy_(x)
    elif isinstance(act, ELU):  # as `ELU` computes it, with no new tensor
        elu_into(x, out)
    else:
        out.copy_(act(x))


def _margined(x: torch.Tensor, act: nn.Module | None, margin: int) -> torch.Tensor:
    """act(x) for x [T, C] inside a [T + 2 margin, C] buffer whose margins are zero."""
    if margin == 0 and act is None:
        return x
    t, c = x.shape
    buf = torch.empty(t + 2 * margin, c)
    buf[:margin].zero_()
    buf[margin + t :].zero_()
    _activate_into(act, x, buf[margin : margin + t])
    return buf


def _tap_weights(conv: nn.Conv1d) -> list[torch.Tensor]:
    """[s·C_in, C_out] per tap: the kernel's samples j·s .. j·s + s - 1 (s = stride), laid out as a
    frame is, (sample, channel) with the channel fastest. Contiguous, so no product copies them;
    kept on the module (not in its state dict) until the weight changes."""
    w = conv.weight  # [C_out, C_in, k]
    key = (w._version, w.data_ptr())
    cached = getattr(conv, "_channels_last_taps", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    c_out, c_in, k = w.shape
    s = conv.stride[0]
    taps = [w[:, :, j * s : (j + 1) * s].permute(2, 1, 0).reshape(s * c_in, c_out).contiguous() for j in range(k // s)]
    conv._channels_last_taps = (key, taps)
    return taps


def _conv(conv: nn.Conv1d, act: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """conv(act(x)) for x [T, C_in] -> [T_out, C_out]."""
    c_out, c_in, k = conv.weight.shape
    (s,), (p,), (d,) = conv.stride, conv.padding, conv.dilation
    if k % s or (s > 1 and d > 1):
        raise ValueError(f"no channels-last path for a convolution with kernel {k}, stride {s}, dilation {d}")
    buf = _margined(x, act, p)  # [T + 2p, C_in]
    t_out = (buf.shape[0] - d * (k - 1) - 1) // s + 1
    if s == 1:
        rows = [buf[j * d : j * d + t_out] for j in range(k)]  # [T_out, C_in] per tap
    else:
        frames = buf[: (t_out + k // s - 1) * s].view(-1, s * c_in)  # [T_out + k/s - 1, s · C_in]
        rows = [frames[j : j + t_out] for j in range(k // s)]
    weights = _tap_weights(conv)
    out = torch.addmm(conv.bias, rows[0], weights[0])  # [T_out, C_out]
    for r, w in zip(rows[1:], weights[1:]):
        out.addmm_(r, w)
    return out


def _run(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The encoder's layers on x [T, C]; an activation is applied as the next convolution reads."""
    act = None
    for layer in layers:
        if isinstance(layer, nn.Conv1d):
            x, act = _conv(layer, act, x), None
        elif isinstance(layer, ResUnit):
            if act is not None:
                raise ValueError("an activation right before a residual unit has no channels-last path")
            a1, conv1, a2, conv2 = layer.block
            x = _conv(conv2, a2, _conv(conv1, a1, x)).add_(x)
        elif act is None:
            act = layer
        else:
            raise ValueError("two activations in a row have no channels-last path")
    return x if act is None else act(x)


@torch.no_grad()
def encode_latents(encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
    """encoder(x) for x [B, 1, T] on the CPU, frame-major: [B, T / hop, D]. Clips go one by one: a
    clip's activations fit the cache, a batch's do not."""
    rows = [_run(encoder.net, row.float().reshape(-1, 1).contiguous()) for row in x[:, 0]]  # [T / hop, D] each
    return torch.stack(rows)
