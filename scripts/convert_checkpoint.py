"""Write a compact, weights-only copy of a Vim checkpoint.

    python scripts/convert_checkpoint.py IN OUT [--ema] [--half] [--model NAME] [--trust-checkpoint]

A released training checkpoint (~115 MB for Vim-Tiny: weights, EMA weights, optimizer state)
becomes a file with only the chosen weights (~28 MB, ~14 MB with --half) plus the model name, so
a Pi with little memory loads it quickly. vim/infer_rpi.py and vim/main.py read it like any
checkpoint; with --half the weights are stored as float16 and turned back into float32 on load.
"""

import argparse
import os
import sys

from vim_rpi import checkpoint_io, factory, registry


def _mb(path):
    return os.path.getsize(path) / 2**20


def _checked_name(args, name, arch, overrides):
    """The registered name to record; refused when the weights are a registered model's and
    `name` built with the file's stored overrides is another architecture (it would not load)."""
    name = registry.resolve_model_name(name)
    fitting = factory.fitting_models(arch)
    if fitting and not factory.fits(arch, name, overrides):
        raise ValueError(f"{args.input} holds {' / '.join(fitting)} weights, not {name}")
    return name


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     epilog="exit status: 0 written, 1 the input cannot be converted or the output "
                                            "not written (one line on stderr), 2 usage error")
    parser.add_argument("input", metavar="IN", help="checkpoint to read (.pth)")
    parser.add_argument("output", metavar="OUT", help="compact checkpoint to write")
    parser.add_argument("--ema", action="store_true", help="keep the EMA weights ('model_ema') instead of 'model'")
    parser.add_argument("--half", action="store_true", help="store floating-point weights as float16")
    parser.add_argument("--model", metavar="NAME", help="model name to record (default: stored or inferred)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow arbitrary pickled objects in IN (only for files you trust)")
    args = parser.parse_args(argv)
    if args.model is not None:
        try:
            registry.resolve_model_name(args.model)
        except ValueError as err:
            parser.error(str(err))
    try:
        state_dict, meta = checkpoint_io.read_state_dict(args.input, ema=args.ema, trust_pickle=args.trust_checkpoint)
        overrides = meta.get("model_args") or {}
        arch = checkpoint_io.infer_architecture(state_dict,
                                                img_size=overrides.get("img_size") or meta.get("input_size") or 224)
        fitting = factory.fitting_models(arch)
        name = args.model or meta.get("model_name") or (fitting[0] if fitting else None)
        if name is not None:
            name = _checked_name(args, name, arch, overrides)
        in_mb = _mb(args.input)  # before writing: OUT may be IN
        checkpoint_io.save_weights(args.output, state_dict, model_name=name, model_args=meta.get("model_args"),
                                   half=args.half)
    except (checkpoint_io.CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.input}: {in_mb:.1f} MB -> {args.output}: {_mb(args.output):.1f} MB "
          f"({len(state_dict)} tensors, model {name or 'unknown'}{', float16' if args.half else ''}"
          f"{', EMA weights' if args.ema else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
