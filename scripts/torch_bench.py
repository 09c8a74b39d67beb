"""PyTorch's side of `scripts/gpu-bench.sh`: the same models and training step as fisherc's
(models/*.toml), timed the same way (median after warm-up, CUDA events), printed as JSON lines;
and, given fisherc's `bench --json` output, the two side by side as a Markdown table.

Step: SGD with momentum 0.9 on random data (3x32x32, batch as asked). Modes:
  plain  the step alone;
  a2g2   plus the supplement's A.5 diagonal (sum over positions of a^2 g^2 per layer, through
         forward/backward hooks) and the noisy update;
  exact  plus exact per-example squared gradients through torch.func (vmap of grad, chunked;
         BN in evaluation mode, since a per-example train-mode BN is not defined there).
Precisions: fp32, tf32 (eager); torch.compile (Inductor, channels_last, tf32) for plain.

  python3 scripts/torch_bench.py --models resnet44 vgg16 --batch 4096 > torch.jsonl
  python3 scripts/torch_bench.py --side-by-side fisherc.json torch.jsonl
"""
import argparse
import json
import sys
import time


def emit(**record):
    print(json.dumps(record), flush=True)


def build_models():
    import torch.nn as nn
    import torch.nn.functional as F

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.project = None
            if stride != 1 or cin != cout:  # shortcut "B", as models/resnet44.toml
                self.project = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return F.relu(y + (x if self.project is None else self.project(x)))

    class ResNet(nn.Module):
        def __init__(self, blocks, widths, classes):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
            layers, cin = [], widths[0]
            for stage, width in enumerate(widths):
                for i in range(blocks):
                    layers.append(Basic(cin, width, 2 if stage > 0 and i == 0 else 1))
                    cin = width
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x):
            x = self.layers(self.stem(x))
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def vgg16(classes):
        plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                512, 512, 512, "M", 512, 512, 512, "M"]
        layers, cin = [], 3
        for v in plan:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                cin = v
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, classes))

    return {
        "resnet20": lambda: (ResNet(3, [16, 32, 64], 10), 10),
        "resnet44": lambda: (ResNet(7, [16, 32, 64], 10), 10),
        "resnet44x2": lambda: (ResNet(7, [32, 64, 128], 100), 100),
        "vgg16": lambda: (vgg16(10), 10),
    }


class A2g2:
    """The supplement's A.5 diagonal per conv/linear weight: sum_t a^2 g^2, through hooks."""

    def __init__(self, model, torch, nn):
        self.torch, self.nn = torch, nn
        self.layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.inputs, self.fisher = {}, {}
        for m in self.layers:
            m.register_forward_hook(self.forward_hook)
            m.register_full_backward_hook(self.backward_hook)

    def forward_hook(self, module, inputs, output):
        self.inputs[module] = inputs[0].detach()

    def backward_hook(self, module, grad_in, grad_out):
        a = self.inputs.pop(module)
        g = grad_out[0].detach() * a.shape[0]  # per-example gradients of the mean loss
        if isinstance(module, self.nn.Conv2d):
            self.fisher[module.weight] = self.torch.nn.grad.conv2d_weight(
                a * a, module.weight.shape, g * g, module.stride, module.padding) / a.shape[0]
        else:
            self.fisher[module.weight] = (g * g).t() @ (a * a) / a.shape[0]


def exact_squares(model, x, y, chunk, torch, F):
    """(1/M) sum_n (grad l_n)^2 of every parameter, through torch.func."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, b, xi, yi):
        return F.cross_entropy(functional_call(model, (p, b), (xi[None],)), yi[None])

    per_example = vmap(grad(loss), in_dims=(None, None, 0, 0), chunk_size=chunk)
    was_training = model.training
    model.eval()
    squares = {k: (g * g).mean(0) for k, g in per_example(params, buffers, x, y).items()}
    model.train(was_training)
    return squares


def bench(name, batch, mode, precision, steps, warmup, chunk):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, classes = build_models()[name]()
    model = model.to(device)
    compiled = precision == "compile"
    tf32 = precision in ("tf32", "compile")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    if compiled:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    params = list(model.parameters())
    momenta = [torch.zeros_like(p) for p in params]
    hooks = A2g2(model, torch, nn) if mode == "a2g2" else None
    forward = torch.compile(model) if compiled else model
    scale = 0.01

    def step():
        loss = F.cross_entropy(forward(x), y)
        for p in params:
            p.grad = None
        loss.backward()
        fisher = {}
        if hooks is not None:
            fisher = {p: hooks.fisher.pop(p) for p in list(hooks.fisher)}
        elif mode == "exact":
            squares = exact_squares(model, x, y, chunk, torch, F)
            named = dict(model.named_parameters())
            fisher = {named[k]: v for k, v in squares.items()}
        with torch.no_grad():
            for p, v in zip(params, momenta):
                g = p.grad
                if p in fisher:
                    g = g + scale * fisher[p].sqrt() * torch.randn_like(g)
                v.mul_(0.9).add_(g)
                p.add_(v, alpha=-0.1)

    started = time.time()
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    warm_s = time.time() - started
    times = []
    for _ in range(steps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            sync()
            times.append(a.elapsed_time(b))
        else:
            t = time.time()
            step()
            times.append((time.time() - t) * 1e3)
    times.sort()
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    emit(model=name, batch=batch, mode=mode, precision=precision, device=device,
         median_ms=round(times[len(times) // 2], 3), min_ms=round(times[0], 3),
         warmup_s=round(warm_s, 1), peak_gb=peak and round(peak, 2))
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def side_by_side(fisherc_json, torch_jsonl):
    """fisherc's medians next to PyTorch's, per model, batch and Fisher mode."""
    ours = json.load(open(fisherc_json))
    theirs = [json.loads(line) for line in open(torch_jsonl) if line.strip().startswith("{")]
    torch_ms = {}
    for r in theirs:
        if "median_ms" in r:
            torch_ms[(r["model"], r["batch"], r["mode"], r["precision"])] = r["median_ms"]
    precisions = ["fp32", "tf32", "compile"]
    variants = ["fused", "fused-tc", "fused-tf32", "unfused"]
    print("| model | batch | fisher | " + " | ".join(f"fisherc {v} ms" for v in variants) + " | "
          + " | ".join(f"torch {p} ms" for p in precisions) + " |")
    print("|---|---|---|" + "---|" * (len(variants) + len(precisions)))
    keys = sorted({(m["model"], m["batch"], m["fisher"]) for m in ours})
    mode_of = {"none": "plain", "a2g2": "a2g2", "exact": "exact"}
    for model, batch, fisher in keys:
        def fisherc(variant):
            for m in ours:
                if (m["model"], m["batch"], m["fisher"], m["variant"]) == (model, batch, fisher, variant):
                    return "failed" if m.get("error") else f"{m['median_ms']:.1f}"
            return "-"
        cells = []
        for p in precisions:
            v = torch_ms.get((model, batch, mode_of[fisher], p))
            cells.append("-" if v is None else f"{v:.1f}")
        print(f"| {model} | {batch} | {fisher} | " + " | ".join(fisherc(v) for v in variants)
              + " | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet44", "vgg16"])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--modes", nargs="+", default=["plain", "a2g2", "exact"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "compile"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=256, help="torch.func vmap chunk (exact)")
    parser.add_argument("--side-by-side", nargs=2, metavar=("FISHERC_JSON", "TORCH_JSONL"))
    args = parser.parse_args()
    if args.side_by_side:
        side_by_side(*args.side_by_side)
        return
    import torch
    emit(torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
         gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    for name in args.models:
        for mode in args.modes:
            for precision in args.precisions:
                if precision == "compile" and mode != "plain":
                    continue  # hooks and torch.func under Inductor are not what is measured
                try:
                    bench(name, args.batch, mode, precision, args.steps, args.warmup, args.chunk)
                except Exception as e:  # one failure (e.g. out of memory) must not stop the rest
                    emit(model=name, batch=args.batch, mode=mode, precision=precision,
                         error=repr(e)[:300])
                    try:
                        torch.cuda.empty_cache()
                    except Exception:
                        pass


if __name__ == "__main__":
    sys.exit(main())
