"""`dynamo-dwdp k8s`: render and validate DynamoGraphDeployment manifests (thin; see dynamo_dwdp/deploy/)."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from dynamo_dwdp.config import load_graph, load_settings
from dynamo_dwdp.deploy import tree
from dynamo_dwdp.deploy.autoscale import render_hpas
from dynamo_dwdp.deploy.dgd import render_graph
from dynamo_dwdp.deploy.tree import BASE_CONFIG, GENERATED, dump_yaml
from dynamo_dwdp.deploy.validate import KIND, load_documents, validate_documents
from dynamo_dwdp.errors import ConfigError, UserError

EPILOG = """\
examples:
  dynamo-dwdp k8s render graphs/disagg_dwdp_decode.yaml -f configs/h200-v2lite.yaml --image myreg/dwdp:v1
  dynamo-dwdp k8s render graphs/trtllm_gb200_dwdp_prefill.yaml -f configs/trtllm-gb200-dsr1.yaml --hpa -o out.yaml
  dynamo-dwdp k8s render-all            # regenerate k8s/ (base, overlays, autoscale)
  dynamo-dwdp k8s render-all --check    # exit 1 when k8s/ is stale
  dynamo-dwdp k8s validate k8s/base/disagg-dwdp-decode/dgd.yaml
  dynamo-dwdp k8s validate k8s/overlays/h200   # a kustomization dir: built with `kubectl kustomize`
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("k8s", help="render/validate DynamoGraphDeployment manifests for the graphs",
                              description="Render serving graphs into DynamoGraphDeployment (nvidia.com/v1beta1) "
                                          "manifests for the Dynamo operator, and validate manifests offline.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="k8s_command", metavar="ACTION", required=True)

    r = sub.add_parser("render", help="render one graph (ConfigMap of trtllm engine YAMLs + DGD [+ HPAs])")
    r.add_argument("graph", help="graphs/<name>.yaml")
    r.add_argument("-f", "--config", action="append", default=None, metavar="CONFIG",
                   help="settings file(s), merged in order (default: configs/tiny-cpu.yaml for native graphs, "
                        "configs/trtllm-gb200-dsr1.yaml for trtllm graphs)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set k8s.gpus_per_node=4 (value parsed as YAML)")
    r.add_argument("--image", help="image of the frontend and native worker pods (k8s.image)")
    r.add_argument("--namespace", help="Kubernetes namespace (k8s.namespace)")
    r.add_argument("--hpa", action="store_true", help="also emit the example HPA per pool")
    r.add_argument("-o", "--output", help="write here instead of stdout")
    r.set_defaults(func=run_render)

    a = sub.add_parser("render-all", help="regenerate every generated file under k8s/")
    a.add_argument("--root", default=".", help="repository root (default: .)")
    a.add_argument("--check", action="store_true", help="write nothing; exit 1 listing stale files")
    a.set_defaults(func=run_render_all)

    v = sub.add_parser("validate", help="validate manifests: CRD schema (strict) + semantic checks")
    v.add_argument("paths", nargs="+", metavar="FILE", help="YAML files, or kustomization directories "
                                                            "(built with `kubectl kustomize`)")
    v.add_argument("--schema-only", action="store_true", help="skip the semantic checks")
    v.set_defaults(func=run_validate)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair}: expected KEY=VALUE (e.g. k8s.gpus_per_node=4)")
        out[key] = yaml.safe_load(value)
    return out


def run_render(args: argparse.Namespace) -> int:
    graph = load_graph(args.graph)
    configs = args.config or [BASE_CONFIG[graph.engine]]
    settings = load_settings(configs, _overrides(args.set))
    docs = render_graph(graph, settings, image=args.image, namespace=args.namespace)
    if args.hpa:
        docs += render_hpas(graph, settings, namespace=args.namespace)
    header = GENERATED.replace("render-all", "render") + f"# Source: {args.graph} + {' + '.join(configs)}\n"
    text = dump_yaml(docs, header)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def run_render_all(args: argparse.Namespace) -> int:
    if args.check:
        stale = tree.stale_files(args.root)
        for rel in stale:
            print(f"stale: {rel}")
        if stale:
            print("k8s/ is stale: run `dynamo-dwdp k8s render-all`", file=sys.stderr)
            return 1
        print("k8s/ is up to date")
        return 0
    changed = tree.write_all(args.root)
    for rel in changed:
        print(f"wrote {rel}")
    print(f"{len(changed)} file(s) changed")
    return 0


def _documents(path: str) -> list:
    p = Path(path)
    if p.is_dir():
        if not (p / "kustomization.yaml").exists():
            raise UserError(f"{path}: a directory must hold a kustomization.yaml")
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise UserError(f"{path}: validating a kustomization needs `kubectl` on PATH (kubectl kustomize)")
        proc = subprocess.run([kubectl, "kustomize", str(p)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"{path}: kubectl kustomize failed: {proc.stderr.strip().splitlines()[-1:]}")
        import yaml

        return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]
    if not p.exists():
        raise UserError(f"{path}: file not found")
    return load_documents(p)


def run_validate(args: argparse.Namespace) -> int:
    import yaml

    failed = 0
    for path in args.paths:
        try:
            docs = _documents(path)
        except yaml.YAMLError as e:
            print(f"{path}: YAML syntax error: {str(e).splitlines()[0]}")
            failed += 1
            continue
        problems = validate_documents(docs, semantic=not args.schema_only)
        dgds = sum(1 for d in docs if isinstance(d, dict) and d.get("kind") == KIND)
        if problems:
            failed += 1
            for line in problems:
                print(f"{path}: {line}")
        else:
            print(f"OK {path} ({len(docs)} document(s), {dgds} DynamoGraphDeployment)")
    return 1 if failed else 0
