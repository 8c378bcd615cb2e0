"""``gradtrace preflight PKG.MODULE:FACTORY --input-shape 64,784``: check a model before training."""
from __future__ import annotations

import json
from typing import Any

from gradtrace.cli._common import load_factory
from gradtrace.errors import EXIT_FINDINGS, EXIT_OK, UsageError

_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "long")


def add_parser(sub: Any) -> None:
    pf = sub.add_parser("preflight", help="predict vanishing/exploding before training")
    pf.add_argument("factory", help="PKG.MODULE:FACTORY, a callable returning an nn.Module")
    pf.add_argument("--input-shape", required=True, help="comma-separated, e.g. 64,784")
    pf.add_argument("--dtype", default="float32", help="input dtype (default: %(default)s)")
    pf.add_argument("--seed", type=int, default=0)
    pf.add_argument("--json", action="store_true", help="print one JSON object")


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise UsageError(f"--input-shape {text!r} must be positive integers separated by commas, e.g. 64,784")
    return shape


def main(args: Any) -> int:
    """Exit 0 when healthy, 3 with findings; input errors are one line and exit 2."""
    import torch
    from torch import nn

    from gradtrace.preflight import preflight

    shape = _parse_shape(args.input_shape)
    if args.dtype not in _DTYPES:
        raise UsageError(f"--dtype {args.dtype!r}; valid: {', '.join(_DTYPES)}")
    dtype = getattr(torch, "int64" if args.dtype == "long" else args.dtype)
    torch.manual_seed(args.seed)
    model = load_factory(args.factory)
    if not isinstance(model, nn.Module):
        raise UsageError(f"factory {args.factory} returned {type(model).__name__}, not an nn.Module")
    gen = torch.Generator().manual_seed(args.seed)
    if dtype.is_floating_point:
        model = model.to(dtype)
        x = torch.randn(shape, generator=gen).to(dtype)
    else:
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        if emb is None:
            raise UsageError(f"--dtype {args.dtype} needs an nn.Embedding in the model to pick token ids")
        x = torch.randint(0, emb.num_embeddings, shape, generator=gen)
    try:
        result = preflight(model, x, seed=args.seed)
    except ValueError as e:     # the model refused this input (wrong shape or dtype)
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"preflight {args.factory}  input {tuple(shape)} {args.dtype}")
        print(result.table())
        print()
        if not result:
            print("healthy: no findings")
        for f in result:
            print(f"[{f.severity}] {f.kind}: {', '.join(f.layers[:6])}{' …' if len(f.layers) > 6 else ''}")
            print(f"  {f.explanation}")
            for fx in f.fixes:
                print(f"  fix: {fx.action}")
                for line in fx.code.splitlines():
                    print(f"      {line}")
    return EXIT_FINDINGS if result else EXIT_OK
