"""Reference code copied from the user's seed notebooks (see /work/shared/seeds/).

``DynamicSpatialAttention`` is the class of ``000_6dac30f8fb666269.txt`` and ``HSwish`` /
``CoordinateAtt`` are section 0 of ``004_14b362d4935c611d.txt``, code copied verbatim (only
the Turkish explanatory comments are shortened). The add-on classes below build the ten
CoordinateAtt add-ons of the same notebook as the notebook tells the reader to: subclasses of
``CoordinateAtt`` whose ``__init__``/``forward`` contain the snippets as written, with the
seed's attribute names (``dw_h``/``dw_w``, ``alpha_h``/``alpha_w``, ``conv1a``...``bn1b``,
``conv_h``/``conv_w`` with ``groups``, ``spatial_dw``/``spatial_pw``, plain ``beta``).

Nothing here imports ``lightning_attn``: this is the independent reference.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------
# Seed 000: DynamicSpatialAttention (verbatim code)
# --------------------------------------------------------------------------------------


class DynamicSpatialAttention(nn.Module):
    def __init__(
        self,
        kernels=(3, 7),
        use_dilated: bool = True,
        dilated_kernel: int = 7,
        dilated_d: int = 2,
        gate: str = "sigmoid",          # "sigmoid" | "hardsigmoid"
        temperature: float = 1.0,
        learnable_temperature: bool = False,
        eps: float = 1e-6,
        router_hidden: int = 8,
        bias: bool = True,
        return_router_weights: bool = False,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature pozitif olmalı.")
        if gate.lower() not in ("sigmoid", "hardsigmoid"):
            raise ValueError("gate 'sigmoid' veya 'hardsigmoid' olmalı.")
        if router_hidden < 1:
            raise ValueError("router_hidden >= 1 olmalı.")

        self.eps = eps
        self.return_router_weights = return_router_weights

        ks = []
        for k in kernels:
            k = int(k)
            if k % 2 == 0:
                k += 1
            if k < 1:
                raise ValueError("kernel_size >= 1 olmalı.")
            ks.append(k)

        self.branches = nn.ModuleList()
        for k in ks:
            p = k // 2
            self.branches.append(nn.Conv2d(2, 1, kernel_size=k, padding=p, bias=False))

        if use_dilated:
            k = int(dilated_kernel)
            if k % 2 == 0:
                k += 1
            if dilated_d < 1:
                raise ValueError("dilated_d >= 1 olmalı.")
            p = dilated_d * (k - 1) // 2
            self.branches.append(
                nn.Conv2d(2, 1, kernel_size=k, padding=p, dilation=dilated_d, bias=False)
            )

        self.num_branches = len(self.branches)

        if gate.lower() == "sigmoid":
            self.gate_fn = torch.sigmoid
        else:
            self.gate_fn = F.hardsigmoid

        self.learnable_temperature = learnable_temperature
        if learnable_temperature:
            t_raw = torch.tensor(float(temperature))
            t_inv = torch.log(torch.exp(t_raw) - 1.0 + eps)
            self.t_raw = nn.Parameter(t_inv)
        else:
            self.register_buffer("T", torch.tensor(float(temperature)))

        self.router = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(2, router_hidden, 1, bias=bias),
            nn.ReLU(inplace=True),
            nn.Conv2d(router_hidden, self.num_branches, 1, bias=bias),
        )

    def _get_T(self) -> torch.Tensor:
        if self.learnable_temperature:
            return F.softplus(self.t_raw) + self.eps
        return self.T

    def forward(self, x: torch.Tensor):
        avg_map = torch.mean(x, dim=1, keepdim=True)
        max_map, _ = torch.max(x, dim=1, keepdim=True)
        s = torch.cat([avg_map, max_map], dim=1)  # (B,2,H,W)

        logits = self.router(s).flatten(1)             # (B,K)
        rw = torch.softmax(logits, dim=1)              # (B,K)

        z = torch.stack([br(s) for br in self.branches], dim=1)  # (B,K,1,H,W)

        wlogit = (rw[:, :, None, None, None] * z).sum(dim=1)     # (B,1,H,W)

        T = self._get_T()
        sa = self.gate_fn(wlogit / T)  # (B,1,H,W)

        y = x * sa

        if self.return_router_weights:
            return y, sa, rw
        return y, sa


# --------------------------------------------------------------------------------------
# Seed 004 section 0: HSwish + CoordinateAtt (verbatim code)
# --------------------------------------------------------------------------------------


class HSwish(nn.Module):
    def forward(self, x):
        return x * F.relu6(x + 3.0, inplace=True) / 6.0


class CoordinateAtt(nn.Module):
    def __init__(
        self,
        in_channels: int,
        reduction: int = 32,
        min_mid_channels: int = 8,
        act: str = "hswish",
        alpha: float = 1.0,
        learnable_alpha: bool = False,
    ):
        super().__init__()
        mid_channels = max(min_mid_channels, in_channels // reduction)

        self.conv1 = nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)

        if act.lower() == "hswish":
            self.act = HSwish()
        elif act.lower() == "relu":
            self.act = nn.ReLU(inplace=True)
        else:
            raise ValueError("act must be 'hswish' or 'relu'")

        self.conv_h = nn.Conv2d(mid_channels, in_channels, kernel_size=1, bias=True)
        self.conv_w = nn.Conv2d(mid_channels, in_channels, kernel_size=1, bias=True)

        if learnable_alpha:
            self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        else:
            self.register_buffer("alpha", torch.tensor(float(alpha)))

        self._last_ah = None
        self._last_aw = None

    def forward(self, x):
        B, C, H, W = x.shape

        x_h = x.mean(dim=3, keepdim=True)                    # (B,C,H,1)
        x_w = x.mean(dim=2, keepdim=True).permute(0,1,3,2)   # (B,C,W,1)

        y = torch.cat([x_h, x_w], dim=2)                     # (B,C,H+W,1)
        y = self.act(self.bn1(self.conv1(y)))                # (B,mid,H+W,1)

        y_h, y_w = torch.split(y, [H, W], dim=2)             # (B,mid,H,1) & (B,mid,W,1)
        y_w = y_w.permute(0,1,3,2)                           # (B,mid,1,W)

        a_h = torch.sigmoid(self.conv_h(y_h))                # (B,C,H,1)
        a_w = torch.sigmoid(self.conv_w(y_w))                # (B,C,1,W)

        self._last_ah = a_h
        self._last_aw = a_w

        att = a_h * a_w                                      # (B,C,H,W)
        scale = (1.0 - self.alpha) + self.alpha * att

        return x * scale

    @torch.no_grad()
    def last_mask_stats(self):
        if self._last_ah is None or self._last_aw is None:
            return None
        ah = self._last_ah
        aw = self._last_aw
        return {
            "a_h": {"min": float(ah.min()), "mean": float(ah.mean()), "max": float(ah.max()), "std": float(ah.std())},  # noqa: E501
            "a_w": {"min": float(aw.min()), "mean": float(aw.mean()), "max": float(aw.max()), "std": float(aw.std())},  # noqa: E501
        }


@torch.no_grad()
def quick_mask_check(att_module, x):
    """Seed add-on 10 (verbatim)."""
    att_module.eval()
    _ = att_module(x)
    stats = att_module.last_mask_stats() if hasattr(att_module, "last_mask_stats") else None
    print(stats)
    if stats is not None:
        if stats["a_h"]["std"] < 0.02 or stats["a_w"]["std"] < 0.02:
            print("UYARI: maske std çok düşük -> maske sabitleniyor olabilir.")


# --------------------------------------------------------------------------------------
# Seed 004 add-ons 1-9, pasted into CoordinateAtt as the notebook says
# --------------------------------------------------------------------------------------


class SeedCoordAttAddons(CoordinateAtt):
    """``CoordinateAtt`` with any subset of the seed's add-ons 1-9 pasted in.

    Each snippet appears below as the notebook writes it, under the flag that switches it
    on. ``dilation`` (add-on 3) replaces the convs of add-on 2 with the dilated ones (the
    notebook's ``d``); ``groups`` is the notebook's ``g`` of add-on 8. With per-axis alpha
    (4) and the residual (6) together, which the notebook leaves open, the residual acts on
    the per-axis product: ``scale = 1 + beta * (scale_h * scale_w - 1)`` (the library's
    documented choice, reducing to add-on 4 at ``beta = 1``).
    """

    def __init__(
        self,
        in_channels: int,
        reduction: int = 32,
        min_mid_channels: int = 8,
        act: str = "hswish",
        alpha: float = 1.0,
        learnable_alpha: bool = False,
        *,
        mean_max: bool = False,            # 1
        axis_dw: bool = False,             # 2
        dilation: int | None = None,       # 3 (implies 2)
        per_axis_alpha: bool = False,      # 4
        hardsigmoid: bool = False,         # 5
        beta: float | None = None,         # 6
        learnable_beta: bool = False,      # 6, "learnable da yapılabilir"
        bottleneck2: bool = False,         # 7
        groups: int | None = None,         # 8
        spatial_gate: bool = False,        # 9
    ):
        super().__init__(in_channels, reduction, min_mid_channels, act, alpha, learnable_alpha)
        mid_channels = max(min_mid_channels, in_channels // reduction)
        self.mean_max = mean_max
        self.axis_dw = axis_dw or dilation is not None
        self.per_axis_alpha = per_axis_alpha
        self.hardsigmoid = hardsigmoid
        self.use_beta = beta is not None
        self.bottleneck2 = bottleneck2
        self.spatial_gate = spatial_gate

        # 2) Axis-wise depthwise conv
        if self.axis_dw and dilation is None:
            self.dw_h = nn.Conv2d(in_channels, in_channels, kernel_size=(3,1), padding=(1,0), groups=in_channels, bias=False)  # noqa: E501
            self.dw_w = nn.Conv2d(in_channels, in_channels, kernel_size=(1,3), padding=(0,1), groups=in_channels, bias=False)  # noqa: E501
        # 3) Dilated axis conv
        if dilation is not None:
            d = dilation
            self.dw_h = nn.Conv2d(in_channels, in_channels, kernel_size=(3,1), padding=(d,0), dilation=(d,1),  # noqa: E501
                                  groups=in_channels, bias=False)
            self.dw_w = nn.Conv2d(in_channels, in_channels, kernel_size=(1,3), padding=(0,d), dilation=(1,d),  # noqa: E501
                                  groups=in_channels, bias=False)

        # 4) Per-axis alpha, "tek alpha yerine iki alpha"
        if per_axis_alpha:
            del self.alpha
            if learnable_alpha:
                self.alpha_h = nn.Parameter(torch.tensor(float(alpha)))
                self.alpha_w = nn.Parameter(torch.tensor(float(alpha)))
            else:
                self.register_buffer("alpha_h", torch.tensor(float(alpha)))
                self.register_buffer("alpha_w", torch.tensor(float(alpha)))

        # 6) Attention residual
        if beta is not None:
            if learnable_beta:
                self.beta = nn.Parameter(torch.tensor(float(beta)))
            else:
                self.beta = beta  # 0.2–1.0 aralığında denenebilir

        # 7) Two-layer bottleneck, replacing conv1/bn1
        if bottleneck2:
            del self.conv1
            del self.bn1
            self.conv1a = nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False)
            self.bn1a   = nn.BatchNorm2d(mid_channels)
            self.conv1b = nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False)
            self.bn1b   = nn.BatchNorm2d(mid_channels)

        # 8) Grouped heads
        if groups is not None:
            g = groups
            self.conv_h = nn.Conv2d(mid_channels, in_channels, kernel_size=1, groups=g, bias=True)  # noqa: E501
            self.conv_w = nn.Conv2d(mid_channels, in_channels, kernel_size=1, groups=g, bias=True)  # noqa: E501

        # 9) Mini spatial gate
        if spatial_gate:
            self.spatial_dw = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1, groups=in_channels, bias=False)  # noqa: E501
            self.spatial_pw = nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=True)

    def forward(self, x):
        B, C, H, W = x.shape

        if self.mean_max:
            # 1) Mean + Max
            x_h_mean = x.mean(dim=3, keepdim=True)
            x_h_max  = x.amax(dim=3, keepdim=True)
            x_h = 0.5 * (x_h_mean + x_h_max)                           # (B,C,H,1)

            x_w_mean = x.mean(dim=2, keepdim=True)
            x_w_max  = x.amax(dim=2, keepdim=True)
            x_w = 0.5 * (x_w_mean + x_w_max)                           # (B,C,1,W)
            x_w = x_w.permute(0, 1, 3, 2)                              # (B,C,W,1)
        else:
            x_h = x.mean(dim=3, keepdim=True)                    # (B,C,H,1)
            x_w = x.mean(dim=2, keepdim=True).permute(0,1,3,2)   # (B,C,W,1)

        if self.axis_dw:
            # 2) forward içinde (x_h ve x_w hesaplandıktan sonra):
            x_h = self.dw_h(x_h)                      # (B,C,H,1)

            x_w_1w = x_w.permute(0,1,3,2)             # (B,C,1,W)
            x_w_1w = self.dw_w(x_w_1w)                # (B,C,1,W)
            x_w = x_w_1w.permute(0,1,3,2)             # (B,C,W,1)

        y = torch.cat([x_h, x_w], dim=2)                     # (B,C,H+W,1)
        if self.bottleneck2:
            # 7)
            y = self.act(self.bn1a(self.conv1a(y)))
            y = self.act(self.bn1b(self.conv1b(y)))
        else:
            y = self.act(self.bn1(self.conv1(y)))                # (B,mid,H+W,1)

        y_h, y_w = torch.split(y, [H, W], dim=2)             # (B,mid,H,1) & (B,mid,W,1)
        y_w = y_w.permute(0,1,3,2)                           # (B,mid,1,W)

        if self.hardsigmoid:
            # 5)
            a_h = F.hardsigmoid(self.conv_h(y_h), inplace=True)
            a_w = F.hardsigmoid(self.conv_w(y_w), inplace=True)
        else:
            a_h = torch.sigmoid(self.conv_h(y_h))                # (B,C,H,1)
            a_w = torch.sigmoid(self.conv_w(y_w))                # (B,C,1,W)

        self._last_ah = a_h
        self._last_aw = a_w

        if self.per_axis_alpha:
            # 4) forward sonunda:
            scale_h = (1.0 - self.alpha_h) + self.alpha_h * a_h         # (B,C,H,1)
            scale_w = (1.0 - self.alpha_w) + self.alpha_w * a_w         # (B,C,1,W)
            scale = scale_h * scale_w                                   # (B,C,H,W)
            if self.use_beta:
                # 4) + 6): left open by the seed; the library's documented combination.
                scale = 1.0 + self.beta * (scale - 1.0)
        else:
            att = a_h * a_w                                      # (B,C,H,W)
            if self.use_beta:
                # 6)
                att = 1.0 + self.beta * (att - 1.0)
            scale = (1.0 - self.alpha) + self.alpha * att

        if self.spatial_gate:
            # 9) forward sonunda (return’dan önce):
            out = x * scale
            gate = torch.sigmoid(self.spatial_pw(self.spatial_dw(out)))
            return out * gate
        return x * scale
