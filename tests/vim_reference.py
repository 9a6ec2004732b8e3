"""An independent float64 Vision Mamba forward, written from the reference doc's math (§2–§4),
used as the oracle for the model tests. Plain loops; reads only a state dict."""

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def scan(u, delta, A, B, C, D, z):
    """u, delta, z: (d, l); A: (d, n); B, C: (n, l); D: (d,). Sequential, one sample."""
    d, l = u.shape
    h = torch.zeros(d, A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(l):
        h = torch.exp(delta[:, t, None] * A) * h + delta[:, t, None] * B[None, :, t] * u[:, t, None]
        ys.append((h * C[None, :, t]).sum(-1) + D * u[:, t])
    return torch.stack(ys, dim=1) * (z * torch.sigmoid(z))


def direction(sd, p, x, z, suffix):
    """One direction of a mixer for one sample: x, z (d, l) -> y (d, l)."""
    w = sd[f"{p}conv1d{suffix}.weight"][:, 0]  # (d, k)
    k = w.shape[1]
    xpad = torch.cat([torch.zeros(x.shape[0], k - 1, dtype=x.dtype), x], dim=1)
    conv = torch.stack([(xpad[:, t:t + k] * w).sum(-1) for t in range(x.shape[1])], dim=1)
    conv = conv + sd[f"{p}conv1d{suffix}.bias"][:, None]
    xc = conv * torch.sigmoid(conv)
    x_dbl = sd[f"{p}x_proj{suffix}.weight"] @ xc  # (r + 2n, l)
    r = sd[f"{p}dt_proj{suffix}.weight"].shape[1]
    n = (x_dbl.shape[0] - r) // 2
    delta = sd[f"{p}dt_proj{suffix}.weight"] @ x_dbl[:r] + sd[f"{p}dt_proj{suffix}.bias"][:, None]
    delta = torch.log1p(torch.exp(delta))
    A = -torch.exp(sd[f"{p}A{suffix}_log"])
    return scan(xc, delta, A, x_dbl[r:r + n], x_dbl[r + n:], sd[f"{p}D{suffix}"], z)


def mixer_v2(sd, p, hidden, divide_out=True):
    """hidden (l, E) -> (l, E): both directions with their own parameters, summed (/2), out_proj."""
    xz = sd[f"{p}in_proj.weight"] @ hidden.T  # (2d, l)
    x, z = xz.chunk(2, dim=0)
    y = direction(sd, p, x, z, "") + direction(sd, p, x.flip(1), z.flip(1), "_b").flip(1)
    if divide_out:
        y = y / 2
    return (sd[f"{p}out_proj.weight"] @ y).T


def vim_forward(sd, img, patch, stride, eps=1e-5, cls="middle"):
    """Logits (b, classes) for images img (b, C, H, W) of a v2 Vim in eval mode."""
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    out = []
    for image in img:
        tokens = F.conv2d(image[None], sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride)
        tokens = tokens.flatten(2)[0].T  # (M, E)
        M = tokens.shape[0]
        if cls == "middle":
            pos = M // 2
            tokens = torch.cat([tokens[:pos], sd["cls_token"][0], tokens[pos:]])
        elif cls == "head":
            pos = 0
            tokens = torch.cat([sd["cls_token"][0], tokens])
        x = tokens + sd["pos_embed"][0]
        residual = torch.zeros_like(x)
        hidden = x
        for i in range(depth):
            residual = residual + hidden
            hidden = mixer_v2(sd, f"layers.{i}.mixer.", rms_norm(residual, sd[f"layers.{i}.norm.weight"], eps))
        feats = rms_norm(residual + hidden, sd["norm_f.weight"], eps)
        out.append(sd["head.weight"] @ feats[pos] + sd["head.bias"])
    return torch.stack(out)
