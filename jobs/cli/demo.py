"""`persona-gov demo`: a local MLflow registry with two audited versions of SmolLM2."""

from __future__ import annotations

import argparse
from typing import Any

from jobs import demo
from jobs.cli.exits import EXIT_INCOMPLETE, EXIT_OK
from jobs.demo import DEMO_SPEC, Plant, run_demo


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="build a local MLflow registry with two audited versions of SmolLM2",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: persona-gov demo --dir demo && mlflow ui --backend-store-uri "
               "sqlite:///demo/mlflow.db",
    )
    p.add_argument("--dir", default="demo", help="where the store lives (default ./demo)")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="model source (default: the pinned SmolLM2 asset)")
    p.add_argument("--questions", default="mmlu", help="question file (default: pinned MMLU)")
    p.add_argument("--n-questions", type=int, help=f"default {DEMO_SPEC['n_questions']}")
    p.add_argument("--plant-layer", type=int, default=Plant.layer)
    p.add_argument("--plant-head", type=int, default=Plant.head)
    p.add_argument("--plant-scale", type=float, default=Plant.scale)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    result = run_demo(args.dir, model=args.model, questions=args.questions,
                      n_questions=args.n_questions,
                      plant=Plant(args.plant_layer, args.plant_head, args.plant_scale))
    return EXIT_INCOMPLETE if any(o.status == "error" for o in result.outcomes) else EXIT_OK
