"""The ``modekernels`` command (also ``python -m modekernels``)."""

from __future__ import annotations

import argparse
import json
import sys

from modekernels.benchtool.cli import add_bench_parser


def _info(args: argparse.Namespace) -> int:
    from modekernels.info import collect, format_info

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from modekernels.demo.run import run_demo

    try:
        run_demo(device=args.device, seed=args.seed, out=args.out, steps=args.steps, quick=args.quick,
                 threads=args.threads, large=args.large)
    except ValueError as exc:
        print(f"modekernels demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from modekernels.demo.adapt import AdaptArgs, run_adapt

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "run")}
    try:
        run_adapt(AdaptArgs(**fields))
    except ValueError as exc:
        print(f"modekernels adapt: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="pretrain a small model on English prose, adapt it to Python code with each method, "
        "print the forgetting / new-domain trade-off (offline)",
    )
    demo.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="demo_out", help="output directory (default ./demo_out)")
    demo.add_argument("--steps", type=int, default=None, help="adaptation steps per method")
    demo.add_argument("--quick", action="store_true", help="a tiny model and a few steps (seconds)")
    demo.add_argument("--large", action="store_true",
                      help="a 25M-parameter model, longer training (for --device cuda)")
    demo.add_argument(
        "--threads", type=int, default=1,
        help="CPU threads for torch (default 1: the small model gains little from more, and one "
        "thread stays fast on a busy machine)",
    )
    demo.set_defaults(run=_demo)


def _add_adapt(commands) -> None:
    from modekernels.demo.adapt import AdaptArgs  # its fields hold the defaults

    adapt = commands.add_parser(
        "adapt", help="adapt a local Hugging Face causal LM to a text corpus with one method",
    )
    source = adapt.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local checkpoint directory (save_pretrained layout)")
    source.add_argument("--config", help="config JSON (with model_type) to build a fresh model from")
    adapt.add_argument("--new-domain", required=True, help="text file of the new domain")
    adapt.add_argument("--original-domain", help="text file of the original domain (evaluated, and mixed in)")
    adapt.add_argument(
        "--method", required=True,
        help="neutral-residues, adamix, mode, moefy, lora, full or adapter",
    )
    adapt.add_argument("--out", required=True, help="directory for the added modules and adapt_report.json")
    adapt.add_argument("--steps", type=int, default=AdaptArgs.steps, help="training steps (default %(default)s)")
    adapt.add_argument("--batch-size", type=int, default=AdaptArgs.batch_size, help="sequences per batch (default %(default)s)")
    adapt.add_argument("--block-size", type=int, default=AdaptArgs.block_size,
                       help="tokens per sequence (capped by the model) (default %(default)s)")
    adapt.add_argument("--lr", type=float, default=AdaptArgs.lr, help="learning rate (default: each method's own)")
    adapt.add_argument("--ratio", type=float, default=AdaptArgs.ratio, help="added parameters / base parameters (default %(default)s)")
    adapt.add_argument("--alpha", type=float, default=AdaptArgs.alpha, help="neutral-residue l1 loss weight (default %(default)s)")
    adapt.add_argument("--mix", type=float, default=AdaptArgs.mix, help="fraction of original-domain rows per batch (default %(default)s)")
    adapt.add_argument("--eval-blocks", type=int, default=AdaptArgs.eval_blocks, help="eval blocks per domain (default %(default)s)")
    adapt.add_argument("--device", default=AdaptArgs.device, help="cpu or cuda (default %(default)s)")
    adapt.add_argument("--seed", type=int, default=AdaptArgs.seed, help="random seed (default %(default)s)")
    adapt.set_defaults(run=_adapt)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modekernels",
        description="Fused kernels for mixtures of experts and gated adapters in Hugging Face models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, devices and backend availability")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=_info)
    _add_demo(commands)
    _add_adapt(commands)
    add_bench_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
