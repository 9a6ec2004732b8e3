"""The float64 references the kernel and model tests trust, written from the definitions (the
reference doc, sections 2-4), never from the packages under test: the scan runs one time step at a
time, the conv one tap at a time, everything in float64 whatever the inputs' dtype.

`rel_err` is the agreement measure every test states its tolerance in.
"""

import torch
import torch.nn.functional as F


def rel_err(got, want):
    """max|got - want| / max|want|, computed in float64 (complex128 when either is complex)."""
    dtype = torch.complex128 if got.is_complex() or want.is_complex() else torch.float64
    got, want = got.detach().to(dtype), want.detach().to(dtype)
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def softplus64(x):
    """log(1 + exp(x)) without overflow, in x's dtype."""
    return torch.logaddexp(x, torch.zeros_like(x))


# ---- causal depthwise conv (section 2) ----------------------------------------------------------

def conv_oracle(x, weight, bias=None, initial_states=None, activation=None, seq_idx=None):
    """Causal depthwise conv from the definition, one tap at a time:

        out[:, c, t] = bias[c] + sum_k weight[c, k] * xpad[:, c, t + k],   then silu when activation

    with xpad = [initial_states or zeros (w-1 columns), x]. x (b, d, l), weight (d, w), bias (d,),
    initial_states (b, d, w-1), seq_idx (b, l). With seq_idx, tap k of output t reads input
    t + k - (w-1) only when that input exists and has the same seq_idx as t.
    Returns out (b, d, l) and the last w-1 columns of xpad (b, d, w-1), both float64.
    """
    x, weight = x.double(), weight.double()
    b, d, l = x.shape
    w = weight.shape[1]
    head = x.new_zeros(b, d, w - 1) if initial_states is None else initial_states.double()
    xpad = torch.cat([head, x], dim=-1)
    out = x.new_zeros(b, d, l)
    for k in range(w):
        term = weight[:, k, None] * xpad[:, :, k:k + l]
        if seq_idx is not None:
            src = torch.arange(l) + k - (w - 1)
            same = (src >= 0) & (seq_idx[:, src.clamp(min=0)] == seq_idx)  # (b, l)
            term = term * same[:, None, :]
        out = out + term
    if bias is not None:
        out = out + bias.double()[:, None]
    if activation is not None:
        out = out * torch.sigmoid(out)
    return out, xpad[:, :, xpad.shape[-1] - (w - 1):]


# ---- selective scan and the Mamba inner path (section 2) ----------------------------------------

def _per_channel(M, b, d, l, complex_state):
    """B or C in any form selective_scan_fn accepts, as the values channel c sees at step t:
    (b, d, n, l), float64 (complex128 for a complex state).
    (d, n): the same at every step (time-invariant).
    (b, n, l) or grouped (b, g, n, l): channel c reads group c // (d / g); with a complex state
    the last dim is 2l, step t being complex(M[..., 2t], M[..., 2t + 1])."""
    M = M.to(torch.complex128 if M.is_complex() else torch.float64)
    if M.dim() == 2:
        return M[None, :, :, None].expand(b, d, M.shape[1], l)
    if complex_state:
        M = torch.complex(M[..., 0::2], M[..., 1::2])
    if M.dim() == 3:
        M = M[:, None]
    return M[:, torch.arange(d) // (d // M.shape[1])]


def scan_oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Sequential selective scan, one time step at a time:

        dt  = softplus(delta + delta_bias)   (the bias and the softplus each optional)
        h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   h_0 = 0
        y_t = sum_n h_t * C_t   (2 Re(sum_n h_t * C_t) for a complex A: a state and its conjugate)
        y   = (y + D * u) * silu(z)   (D and z optional)

    u, delta, z (b, d, l); A (d, n), real or complex; B, C in the forms of `_per_channel`;
    D, delta_bias (d,). Returns y (b, d, l) float64 and h_L (b, d, n) (complex128 for a complex A).
    """
    b, d, l = u.shape
    complex_state = A.is_complex()
    u = u.double()
    A = A.to(torch.complex128 if complex_state else torch.float64)
    dt = delta.double()
    if delta_bias is not None:
        dt = dt + delta_bias.double()[:, None]
    if delta_softplus:
        dt = softplus64(dt)
    Bv, Cv = _per_channel(B, b, d, l, complex_state), _per_channel(C, b, d, l, complex_state)
    h = torch.zeros(b, d, A.shape[1], dtype=A.dtype)
    ys = []
    for t in range(l):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * Bv[..., t]
        y = (h * Cv[..., t]).sum(-1)
        ys.append(2 * y.real if complex_state else y)
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(b, d, 0)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        z = z.double()
        y = y * z * torch.sigmoid(z)
    return y, h


def inner_oracle(xz, conv_weight, conv_bias, x_proj_weight, delta_proj_weight, A, D=None, delta_bias=None,
                 B_proj_bias=None, C_proj_bias=None, delta_softplus=True, A_b=None):
    """The Mamba inner path without out_proj:

        x, z = xz split in halves along channels;  xc = silu(conv(x))
        [dt_low; B; C] = x_proj_weight @ xc   (r, n and n rows);   delta = delta_proj_weight @ dt_low
        y = scan(xc, delta, A, B + B_proj_bias, C + C_proj_bias, D, z, delta_bias, delta_softplus)

    xz (b, 2d, l), conv_weight (d, 1, w), conv_bias (d,), x_proj_weight (r + 2n, d),
    delta_proj_weight (d, r), A and A_b (d, n), D and delta_bias (d,), B/C_proj_bias (n,).
    With A_b (bimamba v1) the conv and projections are shared and a second scan runs over the
    flipped sequence with A_b; its flipped-back output is added. Returns y (b, d, l), float64.
    """
    x, z = xz.double().chunk(2, dim=1)
    xc, _ = conv_oracle(x, conv_weight[:, 0], conv_bias, activation="silu")
    r, n = delta_proj_weight.shape[1], A.shape[1]
    x_dbl = torch.einsum("bdl,ed->ble", xc, x_proj_weight.double())
    delta = torch.einsum("blr,dr->bdl", x_dbl[..., :r], delta_proj_weight.double())
    B, C = x_dbl[..., r:r + n], x_dbl[..., r + n:]
    if B_proj_bias is not None:
        B = B + B_proj_bias.double()
    if C_proj_bias is not None:
        C = C + C_proj_bias.double()
    B, C = B.transpose(1, 2), C.transpose(1, 2)
    y, _ = scan_oracle(xc, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if A_b is not None:
        flip = lambda t: t.flip(-1)
        y_b, _ = scan_oracle(flip(xc), flip(delta), A_b, flip(B), flip(C), D, flip(z), delta_bias, delta_softplus)
        y = y + flip(y_b)
    return y


# ---- the Mamba mixer (section 3) ----------------------------------------------------------------

def params64(module):
    """A module's state dict in float64 (checkpoint key -> detached tensor): the oracles' input."""
    return {k: v.detach().double() for k, v in module.state_dict().items()}


def mixer_inner_oracle(p, hidden, bimamba_type, if_divide_out=False):
    """A mixer's output before out_proj, from parameter dict `p` (checkpoint key -> tensor):

        xz = in_proj(hidden);  "none": inner(xz);  "v1": inner(xz, A_b)
        "v2": inner(xz) + flip(inner_b(flip(xz))), each direction with its own parameters (the _b
              ones backward), /2 when if_divide_out

    with A = -exp(A_log). hidden (b, l, d_model). Returns y (b, d_inner, l), float64.
    """
    xz = F.linear(hidden.double(), p["in_proj.weight"], p.get("in_proj.bias")).transpose(1, 2)  # (b, 2d, l)

    def direction(xz, suffix, A_b=None):
        return inner_oracle(xz, p[f"conv1d{suffix}.weight"], p.get(f"conv1d{suffix}.bias"),
                            p[f"x_proj{suffix}.weight"], p[f"dt_proj{suffix}.weight"], -torch.exp(p[f"A{suffix}_log"]),
                            D=p[f"D{suffix}"], delta_bias=p[f"dt_proj{suffix}.bias"], A_b=A_b)

    if bimamba_type == "none":
        return direction(xz, "")
    if bimamba_type == "v1":
        return direction(xz, "", A_b=-torch.exp(p["A_b_log"]))
    y = direction(xz, "") + direction(xz.flip(-1), "_b").flip(-1)
    return y / 2 if if_divide_out else y


def mixer_oracle(p, hidden, bimamba_type, if_divide_out=False):
    """A mixer's output: out_proj(mixer_inner_oracle(...)) times gamma when the layer has one.
    hidden (b, l, d_model) -> (b, l, d_model), float64."""
    y = mixer_inner_oracle(p, hidden, bimamba_type, if_divide_out)
    out = F.linear(y.transpose(1, 2), p["out_proj.weight"], p.get("out_proj.bias"))
    return out * p["gamma"] if "gamma" in p else out


# ---- norms (section 2) --------------------------------------------------------------------------

def rms_norm64(s, weight, bias, eps):
    """s / sqrt(mean(s^2) + eps) * weight (+ bias), over the last dimension, in float64."""
    s = s.double()
    out = s / torch.sqrt((s * s).mean(-1, keepdim=True) + eps) * weight.double()
    return out if bias is None else out + bias.double()


def layer_norm64(s, weight, bias, eps):
    """(s - mean(s)) / sqrt(var(s) + eps) * weight (+ bias), over the last dimension, in float64."""
    s = s.double()
    centered = s - s.mean(-1, keepdim=True)
    out = centered / torch.sqrt((centered * centered).mean(-1, keepdim=True) + eps) * weight.double()
    return out if bias is None else out + bias.double()


# ---- the whole Vision Mamba (section 4) ---------------------------------------------------------

def vim_forward(sd, img, stride, eps=1e-5, cls="middle"):
    """Logits (b, classes) of a v2 Vim in eval mode, from its state dict `sd` (float64 tensors):

        tokens = patch_embed(img) (a conv with the given stride), M of them;  the class token goes
                 in at index M // 2 ("middle") or 0 ("head");  x = tokens + pos_embed
        residual = 0, hidden = x;  per layer i: residual += hidden;
                 hidden = mixer_i(rms_norm_i(residual))   (v2, outputs /2)
        logits = head(rms_norm_f(residual + hidden) at the class token)

    img (b, C, H, W).
    """
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    tokens = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride)
    tokens = tokens.flatten(2).transpose(1, 2)  # (b, M, E)
    pos = tokens.shape[1] // 2 if cls == "middle" else 0
    cls_token = sd["cls_token"].expand(tokens.shape[0], 1, -1)
    x = torch.cat([tokens[:, :pos], cls_token, tokens[:, pos:]], dim=1) + sd["pos_embed"]
    residual, hidden = torch.zeros_like(x), x
    for i in range(depth):
        prefix = f"layers.{i}."
        residual = residual + hidden
        normed = rms_norm64(residual, sd[prefix + "norm.weight"], None, eps)
        mixer = {k[len(prefix + "mixer."):]: v for k, v in sd.items() if k.startswith(prefix + "mixer.")}
        hidden = mixer_oracle(mixer, normed, "v2", if_divide_out=True)
    feats = rms_norm64(residual + hidden, sd["norm_f.weight"], None, eps)
    return F.linear(feats[:, pos], sd["head.weight"], sd["head.bias"])
