"""Offline validation of DynamoGraphDeployment manifests (no API server, no jsonschema needed).

Two layers:

1. **Schema** (`schema_problems`): the CRD's v1beta1 `openAPIV3Schema` (vendored, descriptions
   stripped, in `schemas/dgd_v1beta1_openapiv3.json`), enforced like a *strict* structural schema: every
   object schema without `additionalProperties` or `x-kubernetes-preserve-unknown-fields` is CLOSED, so
   an unknown or misspelled field is an error (the API server would silently prune it). Root
   `metadata` is checked as ObjectMeta. Supported keywords: type, properties, required,
   additionalProperties, items, enum, pattern, minimum/maximum, minLength/maxLength, maxItems, anyOf,
   format int32/int64, x-kubernetes-int-or-string, x-kubernetes-list-type/map-keys (uniqueness).
2. **Semantics** (`semantic_problems`): what the schema cannot express (the operator's CEL rules and
   webhook, plus this project's invariants): DNS-label names, a `main` container with an image,
   `runtimeVersionOverride` when the main image tag is not a semantic version, GPUs per pod = ranks x
   GPUs per rank of a group pod, a scaling adapter on every worker component, probes on the system
   port, prefill drain >= decode drain; and across documents: HPAs target an existing component's
   DGDSA, ConfigMap-mounted engine files exist.

Every problem is one line `<doc>: <field.path>: <what is wrong>`.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import yaml

API_VERSION = "nvidia.com/v1beta1"
KIND = "DynamoGraphDeployment"
SCHEMA_PATH = Path(__file__).with_name("schemas") / "dgd_v1beta1_openapiv3.json"
DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
SEMVER_TAG_RE = re.compile(r"^v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")
INT_RANGES = {"int32": (-2**31, 2**31 - 1), "int64": (-2**63, 2**63 - 1)}
ANNOTATION = "dynamo-dwdp/"
"""Prefix of the pod-template annotations the renderer writes (role, strategy, ranks, engine, gpus-per-rank)."""


@lru_cache(maxsize=1)
def load_schema() -> dict:
    """The vendored v1beta1 openAPIV3Schema of the DynamoGraphDeployment CRD."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------- schema


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(v), type(v).__name__)


def _type_ok(v: Any, t: str) -> bool:
    if t == "object":
        return isinstance(v, dict)
    if t == "array":
        return isinstance(v, list)
    if t == "string":
        return isinstance(v, str)
    if t == "boolean":
        return isinstance(v, bool)
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return True


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _check(v: Any, s: dict, path: str, out: list[str]) -> None:
    """Append the problems of value `v` against schema node `s` (strict: closed objects)."""
    if s.get("x-kubernetes-int-or-string"):
        if not (_type_ok(v, "integer") or isinstance(v, str)):
            out.append(f"{path}: expected an integer or a string, got {_type_name(v)}")
            return
        if isinstance(v, str) and "pattern" in s and not re.search(s["pattern"], v):
            out.append(f"{path}: {v!r} does not match {s['pattern']}")
        return
    if "anyOf" in s:
        trials = []
        for alt in s["anyOf"]:
            sub: list[str] = []
            _check(v, alt, path, sub)
            if not sub:
                break
            trials.append(sub)
        else:
            out.append(trials[0][0] if trials else f"{path}: matches no allowed form")
            return
    t = s.get("type")
    if t is not None and not _type_ok(v, t):
        if v is None and s.get("nullable"):
            return
        out.append(f"{path}: expected {t}, got {_type_name(v)}")
        return
    if "enum" in s and v not in s["enum"]:
        out.append(f"{path}: {v!r} is not one of {', '.join(map(str, s['enum']))}")
    if isinstance(v, str):
        if "pattern" in s and not re.search(s["pattern"], v):
            out.append(f"{path}: {v!r} does not match {s['pattern']}")
        if "maxLength" in s and len(v) > s["maxLength"]:
            out.append(f"{path}: longer than {s['maxLength']} characters")
        if "minLength" in s and len(v) < s["minLength"]:
            out.append(f"{path}: shorter than {s['minLength']} characters")
    if _type_ok(v, "number"):
        if "minimum" in s and v < s["minimum"]:
            out.append(f"{path}: {v} is below the minimum {s['minimum']}")
        if "maximum" in s and v > s["maximum"]:
            out.append(f"{path}: {v} is above the maximum {s['maximum']}")
        lo_hi = INT_RANGES.get(s.get("format", ""))
        if lo_hi and not lo_hi[0] <= v <= lo_hi[1]:
            out.append(f"{path}: {v} does not fit {s['format']}")
    if isinstance(v, list):
        if "maxItems" in s and len(v) > s["maxItems"]:
            out.append(f"{path}: more than {s['maxItems']} items")
        items = s.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(v):
                _check(item, items, _join(path, i), out)
        keys = s.get("x-kubernetes-list-map-keys")
        if s.get("x-kubernetes-list-type") == "map" and keys:
            seen: dict[tuple, int] = {}
            for i, item in enumerate(v):
                if isinstance(item, dict):
                    k = tuple(item.get(x) for x in keys)
                    if k in seen:
                        out.append(f"{_join(path, i)}: duplicate {'/'.join(keys)} {k if len(k) > 1 else k[0]!r} "
                                   f"(also {path}[{seen[k]}])")
                    seen[k] = i
        elif s.get("x-kubernetes-list-type") == "set":
            for i, item in enumerate(v):
                if item in v[:i]:
                    out.append(f"{_join(path, i)}: duplicate {item!r} in a set")
    if isinstance(v, dict):
        props = s.get("properties", {})
        for req in s.get("required", []):
            if req not in v:
                out.append(f"{_join(path, req)}: required field is missing")
        extra = s.get("additionalProperties")
        open_ = bool(s.get("x-kubernetes-preserve-unknown-fields")) or extra is True
        for key, value in v.items():
            kpath = _join(path, str(key))
            if key in props:
                _check(value, props[key], kpath, out)
            elif isinstance(extra, dict):
                _check(value, extra, kpath, out)
            elif not open_:
                allowed = ", ".join(sorted(props)) or "none (must be {})"
                hint = _did_you_mean(str(key), props)
                out.append(f"{kpath}: unknown field{hint} (allowed: {allowed})")


def _did_you_mean(key: str, names: Iterable[str]) -> str:
    import difflib

    match = difflib.get_close_matches(key, list(names), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _check_object_meta(meta: Any, out: list[str]) -> None:
    if not isinstance(meta, dict):
        out.append("metadata: expected object")
        return
    allowed = {"name", "namespace", "labels", "annotations", "generateName"}
    for key, value in meta.items():
        if key not in allowed:
            out.append(f"metadata.{key}: unknown field{_did_you_mean(key, allowed)} "
                       f"(allowed: {', '.join(sorted(allowed))})")
        elif key in ("labels", "annotations"):
            if not isinstance(value, dict) or not all(isinstance(x, str) for x in value.values()):
                out.append(f"metadata.{key}: expected a map of strings")
        elif not isinstance(value, str):
            out.append(f"metadata.{key}: expected string, got {_type_name(value)}")
    if "name" not in meta and "generateName" not in meta:
        out.append("metadata.name: required field is missing")
    elif "name" in meta and isinstance(meta["name"], str) and not DNS_SUBDOMAIN_RE.match(meta["name"]):
        out.append(f"metadata.name: {meta['name']!r} is not a DNS subdomain (lowercase a-z, 0-9, '-', '.')")


def schema_problems(doc: Any) -> list[str]:
    """Problems of one DGD document against the v1beta1 openAPIV3Schema (strict)."""
    out: list[str] = []
    if not isinstance(doc, dict):
        return [f"top level: expected an object, got {_type_name(doc)}"]
    if doc.get("kind") != KIND:
        return [f"kind: {doc.get('kind')!r} is not {KIND}"]
    if doc.get("apiVersion") != API_VERSION:
        return [f"apiVersion: {doc.get('apiVersion')!r} is the wrong version (allowed: {API_VERSION})"]
    schema = load_schema()
    rest = {k: v for k, v in doc.items() if k != "metadata"}
    top = dict(schema, properties={k: v for k, v in schema["properties"].items() if k != "metadata"})
    _check(rest, top, "", out)
    if "metadata" in doc:
        _check_object_meta(doc["metadata"], out)
    else:
        out.append("metadata: required field is missing")
    return out


# ------------------------------------------------------------------------------------- semantics


def image_tag(image: str) -> str | None:
    """The tag of an image reference (None for a digest or no tag)."""
    if "@" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def is_semver_tag(image: str) -> bool:
    tag = image_tag(image)
    return bool(tag and SEMVER_TAG_RE.match(tag))


def _flag(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _gpus(container: dict) -> int:
    limits = ((container.get("resources") or {}).get("limits") or {})
    value = limits.get("nvidia.com/gpu", 0)
    try:
        return int(str(value))
    except ValueError:
        return -1


def _int(text: Any, default: int | None = None) -> int | None:
    try:
        return int(str(text))
    except (TypeError, ValueError):
        return default


def _env(container: dict) -> dict[str, Any]:
    return {e.get("name"): e.get("value") for e in container.get("env") or [] if isinstance(e, dict)}


def _pod_group(argv: list[str]) -> tuple[int, str | None, list[str]] | None:
    """(ranks in the pod, --device, worker argv) of a native dynamo_dwdp pod; None for other commands."""
    if len(argv) >= 3 and argv[1] == "-m" and argv[2] == "dynamo_dwdp.group":
        ranks = _int(_flag(argv, "--ranks"), 0) or 0
        inner = argv[argv.index("--") + 1:] if "--" in argv else []
        return ranks, _flag(inner, "--device"), inner
    if len(argv) >= 3 and argv[1] == "-m" and argv[2] == "dynamo_dwdp":
        return 1, _flag(argv, "--device"), argv
    return None


def component_problems(comp: dict, i: int, dgd_name: str) -> list[str]:
    """Semantic problems of one component (index i)."""
    out: list[str] = []
    name = comp.get("name", "")
    where = f"spec.components[{i}]"
    ctype = comp.get("type")
    if not DNS_LABEL_RE.match(str(name)):
        out.append(f"{where}.name: {name!r} is not a DNS label (lowercase a-z, 0-9, '-'; at most 63)")
    elif len(dgd_name) + 1 + len(name) > 63:
        out.append(f"{where}.name: '{dgd_name}-{name}' (the component's Service/DGDSA name) is longer than 63")
    replicas = comp.get("replicas", 1)
    if "minAvailable" in comp and replicas != 0 and comp["minAvailable"] > replicas:
        out.append(f"{where}.minAvailable: {comp['minAvailable']} is more than replicas {replicas}")
    if "eppConfig" in comp and ctype != "epp":
        out.append(f"{where}.eppConfig: only allowed when type is epp")
    spec = (comp.get("podTemplate") or {}).get("spec") or {}
    containers = spec.get("containers") or []
    mains = [c for c in containers if isinstance(c, dict) and c.get("name") == "main"]
    cpath = f"{where}.podTemplate.spec.containers"
    if not mains:
        out.append(f"{cpath}: no container named 'main' (the operator injects its defaults into 'main')")
        return out
    main = mains[0]
    m = containers.index(main)
    mpath = f"{cpath}[{m}]"
    image = main.get("image") or ""
    if not image:
        out.append(f"{mpath}.image: the main container needs an image")
    elif not is_semver_tag(image) and "runtimeVersionOverride" not in comp:
        out.append(f"{where}.runtimeVersionOverride: required because the main image tag "
                   f"{image_tag(image)!r} is not a semantic version (allowed: e.g. \"1.6.1\")")
    if ctype in ("worker", "prefill", "decode") and "scalingAdapter" not in comp:
        out.append(f"{where}.scalingAdapter: missing: every worker component opts into its DGDSA "
                   "(scalingAdapter: {}) so each pool scales on its own")
    # GPUs of a group pod
    argv = [str(a) for a in (main.get("command") or []) + (main.get("args") or [])]
    annotations = ((comp.get("podTemplate") or {}).get("metadata") or {}).get("annotations") or {}
    nodes = ((comp.get("multinode") or {}).get("nodeCount")) or 1
    gpus = _gpus(main)
    gpr = _int(annotations.get(ANNOTATION + "gpus-per-rank"))
    ann_ranks = _int(annotations.get(ANNOTATION + "ranks"))
    group = _pod_group(argv)
    gpu_path = f"{mpath}.resources.limits.nvidia.com/gpu"
    if gpus < 0:
        out.append(f"{gpu_path}: not a whole number of GPUs")
    if group is not None:
        ranks, device, inner = group
        size = _int(_flag(inner, "--group-size"))
        if size is not None and size != ranks:
            out.append(f"{mpath}.args: --group-size {size} but the pod runs {ranks} rank(s)")
        if ann_ranks is not None and ann_ranks != ranks:
            out.append(f"{where}.podTemplate.metadata.annotations.{ANNOTATION}ranks: {ann_ranks} but the pod "
                       f"runs {ranks} rank(s)")
        if "--group-rank" in inner and argv[2] == "dynamo_dwdp.group":
            out.append(f"{mpath}.args: --group-rank is set by dynamo_dwdp.group per rank, not in the pod spec")
        expected = 0 if device == "cpu" else ranks * (gpr if gpr is not None else 1)
        if gpus * nodes != expected:
            out.append(f"{gpu_path}: {gpus} GPU(s) x {nodes} node(s) but the group has {ranks} rank(s) on "
                       f"{device or 'cuda'} (expected {expected} in all)")
    elif ann_ranks is not None and gpr is not None:
        expected = ann_ranks * gpr
        if gpus * nodes != expected:
            out.append(f"{gpu_path}: {gpus} GPU(s) x {nodes} node(s) but the pool's group has {ann_ranks} "
                       f"rank(s) x {gpr} GPU(s) (expected {expected} in all)")
    # probes on the system port
    port = _int(_env(main).get("DYN_SYSTEM_PORT"))
    if port is not None:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            http = ((main.get(probe) or {}).get("httpGet")) or {}
            if http and _int(http.get("port")) != port:
                out.append(f"{mpath}.{probe}.httpGet.port: {http.get('port')!r} but DYN_SYSTEM_PORT is {port}")
    return out


def semantic_problems(doc: dict) -> list[str]:
    """Semantic problems of one DGD document (assumes the schema layer passed)."""
    out: list[str] = []
    name = str((doc.get("metadata") or {}).get("name", ""))
    if not DNS_LABEL_RE.match(name):
        out.append(f"metadata.name: {name!r} is not a DNS label (component resources are named <dgd>-<component>)")
    comps = (doc.get("spec") or {}).get("components") or []
    if not comps:
        out.append("spec.components: must have at least one component")
    lowered: dict[str, int] = {}
    for i, comp in enumerate(comps):
        low = str(comp.get("name", "")).lower()
        if low in lowered:
            out.append(f"spec.components[{i}].name: {comp.get('name')!r} is not unique (case-insensitively: "
                       f"spec.components[{lowered[low]}])")
        lowered[low] = i
        out += component_problems(comp, i, name)
    if sum(1 for c in comps if c.get("type") == "epp") > 1:
        out.append("spec.components: at most one component may have type epp")
    if not any(c.get("type") == "frontend" for c in comps):
        out.append("spec.components: no component of type frontend (nothing serves HTTP)")

    def grace(c: dict) -> int:
        return ((c.get("podTemplate") or {}).get("spec") or {}).get("terminationGracePeriodSeconds", 30)

    prefill = [c for c in comps if c.get("type") == "prefill"]
    decode = [c for c in comps if c.get("type") == "decode"]
    if prefill and decode:
        need = max(grace(c) for c in decode)
        for c in prefill:
            if grace(c) < need:
                i = comps.index(c)
                out.append(f"spec.components[{i}].podTemplate.spec.terminationGracePeriodSeconds: {grace(c)} is "
                           f"shorter than decode's {need} (prefill waits for decode peers to finish reading KV)")
    return out


def cross_problems(docs: list[dict]) -> list[tuple[int, str]]:
    """Problems between documents: HPA targets, ConfigMap engine files. (doc index, message)."""
    out: list[tuple[int, str]] = []
    adapters = {}
    configmaps = {}
    for d in docs:
        if not isinstance(d, dict):
            continue
        name = (d.get("metadata") or {}).get("name")
        if d.get("kind") == KIND:
            for c in (d.get("spec") or {}).get("components") or []:
                if c.get("type") != "frontend" and "scalingAdapter" in c:
                    adapters[f"{name}-{str(c.get('name', '')).lower()}"] = c
        elif d.get("kind") == "ConfigMap" and d.get("apiVersion") == "v1":
            configmaps[name] = d.get("data") or {}
    for j, d in enumerate(docs):
        if not isinstance(d, dict):
            continue
        if d.get("kind") == "HorizontalPodAutoscaler":
            ref = (d.get("spec") or {}).get("scaleTargetRef") or {}
            if ref.get("kind") != "DynamoGraphDeploymentScalingAdapter":
                out.append((j, f"spec.scaleTargetRef.kind: {ref.get('kind')!r} (allowed: "
                               "DynamoGraphDeploymentScalingAdapter)"))
            elif ref.get("apiVersion") != API_VERSION:
                out.append((j, f"spec.scaleTargetRef.apiVersion: {ref.get('apiVersion')!r} (allowed: {API_VERSION})"))
            elif adapters and ref.get("name") not in adapters:
                out.append((j, f"spec.scaleTargetRef.name: {ref.get('name')!r} is no component's DGDSA (allowed: "
                               f"{', '.join(sorted(adapters))})"))
            lo, hi = (d.get("spec") or {}).get("minReplicas", 1), (d.get("spec") or {}).get("maxReplicas", 0)
            if lo < 1 or hi < lo:
                out.append((j, f"spec.minReplicas/maxReplicas: {lo}/{hi} (allowed: 1 <= min <= max)"))
        if d.get("kind") == KIND and configmaps:
            for i, c in enumerate((d.get("spec") or {}).get("components") or []):
                pspec = (c.get("podTemplate") or {}).get("spec") or {}
                vols = {v.get("name"): (v.get("configMap") or {}).get("name") for v in pspec.get("volumes") or []
                        if isinstance(v, dict) and "configMap" in v}
                for container in pspec.get("containers") or []:
                    argv = [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]
                    text = " ".join(argv)
                    for mount in container.get("volumeMounts") or []:
                        cm = vols.get(mount.get("name"))
                        if cm is None:
                            continue
                        prefix = mount.get("mountPath", "").rstrip("/") + "/"
                        for token in re.findall(re.escape(prefix) + r"([A-Za-z0-9._-]+)", text):
                            if cm in configmaps and token not in configmaps[cm]:
                                out.append((j, f"spec.components[{i}]: engine file {prefix}{token} is not a key of "
                                               f"ConfigMap {cm} (keys: {', '.join(sorted(configmaps[cm]))})"))
    return out


# ------------------------------------------------------------------------------------ documents


def load_documents(path: str | Path) -> list[Any]:
    """All YAML documents of a file (empty documents dropped)."""
    text = Path(path).read_text(encoding="utf-8")
    return [d for d in yaml.safe_load_all(text) if d is not None]


def doc_label(doc: Any, index: int) -> str:
    if isinstance(doc, dict):
        return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"
    return f"document {index}"


def validate_documents(docs: list[Any], *, semantic: bool = True) -> list[str]:
    """Problems of a set of documents: every DGD (schema + semantics) and the cross-document rules.

    Non-DGD kinds (ConfigMap, HPA, ComputeDomain, PVC, Kustomization, ...) get only the cross checks.
    Messages: `<Kind>/<name>: <field.path>: <problem>`.
    """
    out: list[str] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            continue
        label = doc_label(doc, i)
        problems = schema_problems(doc)
        if not problems and semantic:
            problems = semantic_problems(doc)
        out += [f"{label}: {p}" for p in problems]
    if semantic:
        out += [f"{doc_label(docs[j], j)}: {p}" for j, p in cross_problems(docs)]
    return out
