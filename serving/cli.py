"""The `enginehouse` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from serving.settings import Settings


def _cmd_runtimes(args: argparse.Namespace) -> int:
    from runtimes.catalogue import print_catalogue

    print_catalogue(args.json)
    return 0


def _read_input(path: Path) -> Any:
    """An input file: ``.npy`` (one tensor for a one-input model), ``.npz`` (named) or OIP v2 / instances JSON."""
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    return json.loads(path.read_text())


async def _predict(model_dir: Path, input_path: Path) -> dict[str, Any]:
    from runtimes.registry import load_model
    from serving.dataplane.codec import decode_request, encode_response

    adapter = await load_model(model_dir)
    try:
        data = _read_input(input_path)
        if isinstance(data, np.ndarray):
            assert adapter.signature is not None
            inputs, meta = {adapter.signature.inputs[0].name: data}, dict[str, Any]()
        elif isinstance(data, dict) and all(isinstance(v, np.ndarray) for v in data.values()):
            inputs, meta = data, dict[str, Any]()
        else:
            inputs, meta = decode_request(adapter.name, data, adapter.signature)
        outputs = await adapter.infer(inputs)
        return encode_response(adapter.name, None, outputs, meta)
    finally:
        await adapter.unload()


def _cmd_predict(args: argparse.Namespace) -> int:
    from runtimes.errors import EnginehouseError

    try:
        print(json.dumps(asyncio.run(_predict(Path(args.path), Path(args.input)))))
    except EnginehouseError as exc:
        print(f"error {exc.error_code}: {exc.message}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: cannot read input {args.input}: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    settings = Settings(**overrides)
    from serving.launcher import run_up

    return run_up(settings)


def _cmd_token_create(args: argparse.Namespace) -> int:
    from serving.controlplane.auth import new_token
    from serving.registry import open_registry

    settings = Settings()
    registry = open_registry(settings.database_url, settings.home)
    try:
        token = new_token()
        registry.add_token(args.project, token, args.description)
    finally:
        registry.close()
    # the only time the token is shown: the registry keeps its SHA-256 alone
    print(token)
    return 0


def _cmd_template(args: argparse.Namespace) -> int:
    """list / show / create / delete model-service templates, straight on the registry."""
    from pydantic import ValidationError

    from runtimes.errors import EnginehouseError
    from serving.controlplane import templates
    from serving.registry import open_registry

    settings = Settings()
    registry = open_registry(settings.database_url, settings.home)
    try:
        templates.seed_system(registry)
        if args.template_command == "list":
            rows = registry.list_templates(args.project)
            for r in rows:
                kind = "system" if r.system else r.project_id
                print(f"{r.uuid}  {r.name:<28} {r.spec.get('framework', ''):<10} {kind}")
        elif args.template_command == "show":
            row = registry.get_template(args.uuid)
            print(json.dumps(templates.inventory(row, registry.template_users(row.uuid)), indent=2))
        elif args.template_command == "create":
            raw = Path(args.file).read_text()
            data = json.loads(raw) if args.file.endswith(".json") else _yaml_mapping(raw)
            print(templates.create(registry, args.project, templates.TemplateCreate.model_validate(data)))
        else:
            registry.delete_template(args.project, args.uuid)
    except ValidationError as exc:
        print(f"error: {args.file}: {exc}", file=sys.stderr)
        return 2
    except EnginehouseError as exc:
        print(f"error {exc.error_code}: {exc.message}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        registry.close()
    return 0


def _yaml_mapping(text: str) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError("the template file must hold a mapping of template fields")
    return data


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="enginehouse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("runtimes", help="print the runtime catalogue (engines, runtimes, accelerators)")
    p.add_argument("--json", action="store_true", help="the ai-engine-runtimes JSON instead of a table")
    p.set_defaults(func=_cmd_runtimes)

    p = sub.add_parser("predict", help="load one model version in-process and print the OIP v2 response")
    p.add_argument("path", help="a model version folder (with config.json)")
    p.add_argument("--input", required=True, help=".npy, .npz, or a JSON OIP v2 request / instances")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("up", help="start Ray, Ray Serve and the control plane, serving the example models")
    p.add_argument("--host", help="control-plane bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="control-plane port (default 8080)")
    p.add_argument("--data-host", dest="data_host", help="data-plane bind address (default 127.0.0.1)")
    p.add_argument("--data-port", dest="data_port", type=int, help="data-plane port (default 8000)")
    p.add_argument("--model-repository", dest="model_repository", help="model repository folder")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="join this Ray cluster")
    p.add_argument("--num-cpus", dest="num_cpus", type=int, help="CPUs for the embedded Ray")
    p.set_defaults(func=_cmd_up)

    from serving.batch.cli import add_parser as add_batch_parser

    add_batch_parser(sub)

    p = sub.add_parser("token", help="manage the API tokens (each belongs to one project)")
    token_sub = p.add_subparsers(dest="token_command", required=True)
    t = token_sub.add_parser("create", help="create a token for a project and print it once")
    t.add_argument("--project", required=True, help="the project the token opens")
    t.add_argument("--description", default="", help="what the token is for")
    t.set_defaults(func=_cmd_token_create)

    p = sub.add_parser("template", help="model-service templates: recipes for Custom engines (ZStack's)")
    template_sub = p.add_subparsers(dest="template_command", required=True)
    t = template_sub.add_parser("list", help="the system templates and the project's own")
    t.add_argument("--project", default="default")
    t = template_sub.add_parser("show", help="one template, as the ZStack API answers it")
    t.add_argument("uuid", help="uuid or name")
    t = template_sub.add_parser("create", help="create a template from a JSON or YAML file of its fields")
    t.add_argument("--file", required=True, help="the template's fields (name, startCommand, yaml, ...)")
    t.add_argument("--project", default="default")
    t = template_sub.add_parser("delete", help="delete one of the project's templates (not while a model uses it)")
    t.add_argument("uuid")
    t.add_argument("--project", default="default")
    p.set_defaults(func=_cmd_template)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `enginehouse` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
