"""``voxswap pipeline set|list|remove``: named pipelines in the registry folder.

A running server reads ``pipelines.json`` at the next request that names one (one ``stat``), so a
pipeline set here is served at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_pipeline_commands(sub: Any, registry_arg: Callable[[argparse.ArgumentParser], None],
                          catalog: Callable[[argparse.Namespace], Any]) -> None:
    pipe = sub.add_parser("pipeline", help="named pipelines: voice activity -> speech recognition -> punctuation")
    psub = pipe.add_subparsers(dest="pipeline_command", required=True)
    put = psub.add_parser("set", help="create or change a pipeline")
    registry_arg(put)
    put.add_argument("name")
    put.add_argument("--asr", required=True, help="the speech recognition model")
    put.add_argument("--vad", help="a voice activity detection model (kind fsmn-vad)")
    put.add_argument("--punc", help="a punctuation model (kind ct-punc)")
    put.add_argument("--smoke-audio", type=Path, action="append", default=[],
                     help="a golden clip through the whole pipeline: every stage's new version must pass it")
    put.add_argument("--smoke-text", action="append", default=[], help="what the pipeline answers for it")
    lst = psub.add_parser("list", help="list the pipelines")
    registry_arg(lst)
    lst.add_argument("--json", action="store_true")
    rm = psub.add_parser("remove", help="remove a pipeline (its models stay)")
    registry_arg(rm)
    rm.add_argument("name")
    pipe.set_defaults(func=lambda args: _pipeline(args, catalog(args)))


def _pipeline(args: argparse.Namespace, catalog: Any) -> int:
    from server.storage.pipelines import PipelineStore

    store = PipelineStore(catalog)
    if args.pipeline_command == "set":
        if len(args.smoke_audio) != len(args.smoke_text):
            print("error: give one --smoke-text per --smoke-audio", file=sys.stderr)
            return 2
        pipeline = store.set(args.name, asr=args.asr, vad=args.vad, punc=args.punc,
                             smoke=list(zip(args.smoke_audio, args.smoke_text, strict=True)))
        print(f"pipeline {pipeline.name}: {_stages(pipeline)}")
    elif args.pipeline_command == "remove":
        print(f"removed pipeline {store.remove(args.name).name}")
    elif args.json:
        print(json.dumps({"pipelines": [p.to_json() for _, p in sorted(store.all().items())]}, indent=2))
    else:
        for name, pipeline in sorted(store.all().items()):
            print(f"{name}: {_stages(pipeline)}")
    return 0


def _stages(pipeline: Any) -> str:
    return " -> ".join(f"{role} {model}" for role, model in pipeline.stages().items())
