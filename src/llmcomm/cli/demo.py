"""``llmcomm demo``: a TP x EP decoder with random weights, run across processes and checked,
step by step, against a single-process reference model holding the same weights."""

from __future__ import annotations

from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a TP+EP decoder end to end and check it")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="cpu (gloo) or cuda (NCCL, one GPU per rank); default: cpu")
    p.add_argument("--preset", default=None, help="tiny | tiny128 | llama-8b | deepseek-v3 "
                   "(default: tiny on cpu, deepseek-v3 on cuda)")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1, help="only 1 is supported by the demo")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=12, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=4, help="decode steps")
    p.add_argument("--allreduce-backend", default="auto")
    p.add_argument("--moe-backend", default="auto")
    p.add_argument("--no-graphs", action="store_true", help="decode without CUDA graphs")
    p.add_argument("--moe-fp8", action="store_true",
                   help="dispatch MoE tokens as fp8 (EPDispatcher(fp8=True)); needs a hidden "
                        "size divisible by 128: the cpu default preset is then tiny128")
    p.add_argument("--compile", action="store_true",
                   help="run the model's forward under torch.compile(fullgraph=True): aot_eager "
                        "on cpu, inductor on cuda (llmcomm calls are single custom ops)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.set_defaults(func=run)


def run(args: Any) -> int:
    from ..demo.presets import PRESETS
    from ..demo.run import DemoConfig, run as run_demo, summarize

    device = args.device or "cpu"
    preset = args.preset or (("tiny128" if args.moe_fp8 else "tiny") if device == "cpu"
                             else "deepseek-v3")
    if args.pp != 1:
        raise SystemExit("llmcomm demo: --pp > 1 is not supported by the demo model (it has no "
                         "pipeline stages); use --tp and --dp")
    if preset not in PRESETS:
        raise SystemExit(f"llmcomm demo: unknown preset {preset!r}; choose {', '.join(PRESETS)}")
    if args.moe_fp8 and (not PRESETS[preset].moe_layers or PRESETS[preset].hidden % 128):
        raise SystemExit(f"llmcomm demo: --moe-fp8 needs an MoE preset with a hidden size "
                         f"divisible by 128; {preset} has hidden {PRESETS[preset].hidden}"
                         f"{'' if PRESETS[preset].moe_layers else ' and no MoE layer'}; "
                         f"use --preset tiny128 (cpu) or deepseek-v3")
    cfg = DemoConfig(preset=preset, tp=args.tp, dp=args.dp, device=device, batch=args.batch,
                     prompt=args.prompt, decode_steps=args.steps,
                     allreduce_backend=args.allreduce_backend, moe_backend=args.moe_backend,
                     graphs=not args.no_graphs, compile=args.compile, moe_fp8=args.moe_fp8)
    results = run_demo(cfg, timeout=args.timeout)
    ok, text = summarize(cfg, results)
    print(text)
    return 0 if ok else 1
