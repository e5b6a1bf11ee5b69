"""Pieces of a TIGER training step at the authors' size, each against its alternative, same run:

- dropout: torch's F.dropout (a Bernoulli mask, as nn.Dropout and SDPA's math path draw it) vs a
  mask from uniform draws (`rand >= p`, the same distribution, another random stream), forward +
  backward, at the feed-forward activations [B*S, d_ff] and the attention weights [B, H, S, S],
  for the padded width (81) and the mean bucketed width;
- ranking loss: letter_ext.dot_product_cross_entropy vs F.linear + F.cross_entropy (same math)
  at V = 1,027 (4 x 256 codes + 3 special tokens), d 128, rows = batch x 4 tokens;
- the share of one training step's CPU time spent in Bernoulli draws (torch.profiler), padded
  and bucketed.
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

NAME = "rec_components"


def add_arguments(p) -> None:
    from . import count

    g = p.add_argument_group(NAME)
    g.add_argument("--comp-repeats", type=count(), default=7)
    g.add_argument("--comp-bucketed-width", type=count(), default=24, help="mean trimmed width of bucketed batches")


class _UniformDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        mask = torch.rand(x.shape, device=x.device) >= p
        ctx.save_for_backward(mask)
        ctx.scale = 1.0 / (1.0 - p)
        return x * mask * ctx.scale

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask * ctx.scale, None


def _compare(fns: dict, make, repeats: int, timer) -> dict:
    times = {k: [] for k in fns}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            args = make()
            t0 = timer()
            fns[name](*args).sum().backward()
            times[name].append(timer() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    names = list(fns)
    return {"median_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
            f"{names[1]}/{names[0]}": round(med[names[1]] / med[names[0]], 3)}


def _bernoulli_share(width: int, batch: int, timer) -> dict:
    from letter.rec import RecConfig
    from letter.rec.data import RecData
    from letter.rec.model import EOS, Tiger

    torch.manual_seed(0)
    model = Tiger(1027, **RecConfig().model_kwargs()).train()
    enc = torch.randint(3, 1027, (batch, width))
    enc[:, -1] = EOS
    labels = torch.randint(3, 1027, (batch, 4))

    def step():
        loss = model.loss(enc, RecData.decoder_inputs(labels), labels, reduction="sum") / labels.numel()
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    with torch.profiler.profile() as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    share = lambda names: round(sum(e.self_cpu_time_total for e in events if e.key in names) / total, 4)  # noqa: E731
    return {"width": width, "batch": batch, "bernoulli_share": share({"aten::bernoulli_"}),
            "dropout_mul_and_bernoulli_share_upper_bound": share({"aten::bernoulli_", "aten::mul", "aten::div_"}),
            "matmul_share": share({"aten::mm", "aten::bmm", "aten::addmm"})}


def run(args) -> dict:
    from letter.devices import resolve_device
    from letter_ext import dot_product_cross_entropy

    from . import clock

    timer = clock(args.clock)
    device = resolve_device(args.device)
    if device.type != "cpu":
        raise SystemExit("rec_components measures CPU paths; run it with --device cpu")
    p, batch, heads, d_ff = 0.1, 256, 6, 1024
    out = {"benchmark": NAME, "threads": torch.get_num_threads(), "clock": args.clock, "dropout": {}, "loss": {}}
    for width in (81, args.comp_bucketed_width):
        for what, shape in (("feed_forward", (batch * width, d_ff)), ("attention", (batch, heads, width, width))):
            make = lambda shape=shape: (torch.randn(shape, requires_grad=True),)  # noqa: E731
            out["dropout"][f"{what}_width{width}"] = {"shape": list(shape), **_compare(
                {"F.dropout": lambda x: F.dropout(x, p, True), "uniform_mask": lambda x: _UniformDropout.apply(x, p)},
                make, args.comp_repeats, timer)}
    for rows in (256 * 4, 1024 * 4):
        def make(rows=rows):
            q = torch.randn(rows, 128, requires_grad=True)
            keys = torch.randn(1027, 128, requires_grad=True)
            targets = torch.randint(3, 1027, (rows,))
            return q, keys, targets
        out["loss"][f"rows{rows}"] = _compare({
            "fused": lambda q, k, t: dot_product_cross_entropy(q, k, t, temperature=0.7, ignore_index=0, reduction="sum"),
            "eager": lambda q, k, t: F.cross_entropy(F.linear(q, k) / 0.7, t, ignore_index=0, reduction="sum"),
        }, make, args.comp_repeats, timer)
    out["step_profile"] = [_bernoulli_share(w, batch, timer) for w in (81, args.comp_bucketed_width)]
    return out


def summary(result: dict) -> str:
    d = "; ".join(f"{k} uniform/F.dropout {v['uniform_mask/F.dropout']:.2f}" for k, v in result["dropout"].items())
    loss = "; ".join(f"{k} eager/fused {v['eager/fused']:.2f}" for k, v in result["loss"].items())
    prof = "; ".join(f"width {s['width']}: bernoulli {s['bernoulli_share']:.1%} of the step"
                     for s in result["step_profile"])
    return f"{NAME}: dropout time ratios {d}; loss time ratios {loss}; {prof}"
