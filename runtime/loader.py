"""Open a bundle: verify before anything is mapped, check it fits this device, build the backend."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from edge_sdk.bundle import verify_bundle
from edge_sdk.errors import BundleError, ConfigError, require

from .backends import providers as prov
from .backends.engine_cache import EngineKey, bundle_hash, settings_hash
from .backends.kv_cache import ModelIO
from .backends.tensorrt import tensorrt_version
from .options import RuntimeOptions

log = logging.getLogger("edge_sdk.runtime")

FORMAT = "edge-sdk-bundle"
REQUIRED_KEYS = ("architecture", "graphs", "io", "tokenizer")


def open_bundle(bundle: str | Path, options: RuntimeOptions) -> dict:
    """Verify hashes (and signature with a trusted key), then the manifest's content; return it."""
    root = Path(bundle)
    manifest = verify_bundle(root, options.public_key, require_signature=options.public_key is not None)
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{root}: manifest format is {manifest.get('format')!r}, not {FORMAT!r}",
                          hint="this directory was not written by `edge-sdk convert`")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{root}: manifest lacks {', '.join(missing)}", hint="re-convert the model with this edge-sdk version")
    check_board(manifest, options)
    return manifest


def check_board(manifest: dict, options: RuntimeOptions) -> None:
    """A bundle planned for named boards refuses others; an unknown board name is an error."""
    board = options.target_board
    if board is None:
        return
    from edge_sdk.boards import get_board

    get_board(board)  # raises UnknownBoardError naming the valid boards
    targets = manifest.get("boards") or manifest.get("target", {}).get("boards")
    if targets and board not in targets:
        raise ConfigError(f"this bundle was built for {', '.join(targets)}, not {board}",
                          hint=f"convert it again with --board {board}, or run it on one of those boards")


def graph_file(manifest: dict, kind: str, root: Path) -> Path:
    """The bundle's graph of this kind. A GPU provider asks for fp16: no silent fp32 fallback."""
    entry = manifest["graphs"].get(kind)
    if not entry:
        if kind == "fp16":
            raise ConfigError(f"{root}: the bundle has no fp16 graph, which the GPU providers run",
                              hint="convert with --fp16-graph, or load with provider='cpu'")
        raise BundleError(f"{root}: manifest lists no {kind} graph", hint="re-convert the model")
    return bundle_file(manifest, entry["file"], root)


def ep_build_settings(io: ModelIO, options: RuntimeOptions):
    """The TensorRT EP's profile ranges: the same EngineBuildSettings as `engine build`, from the load's
    max_batch and context (default min(4096, model max)) and the 512-token prefill chunk."""
    from .backends.tensorrt.build import EngineBuildSettings

    top = options.max_seq_len or min(4096, io.max_positions)
    prompt = min(512, top)
    return EngineBuildSettings(max_batch=options.max_batch, max_prompt=prompt, max_seq_len=top, opt_prompt=min(128, prompt),
                               opt_past=min(512, top - 1))


def bundle_file(manifest: dict, rel: str, root: Path) -> Path:
    """Path of a file the manifest lists and verification hashed (parse_manifest binds every field
    that names a file to `files`; this refuses anything else)."""
    if rel not in manifest.get("files", {}):
        raise BundleError(f"{root}: {rel!r} is not a file listed (and hashed) in the manifest", hint="re-convert the model")
    return root / rel


def manifest_digest(root: Path, manifest: dict) -> str:
    """sha256 of the verified manifest bytes (engine and fused-graph caches are keyed by it)."""
    return getattr(manifest, "digest", None) or bundle_hash(root)


def make_backend(root: Path, manifest: dict, options: RuntimeOptions):
    io = ModelIO.from_manifest(manifest)
    if options.provider == "tensorrt":
        from .backends.tensorrt.backend import TensorRTBackend

        return TensorRTBackend.from_cache(root, io, options)
    ort = require("onnxruntime", "runtime")
    providers = prov.choose(options.provider, ort.get_available_providers())
    ep_options = {}
    if prov.TRT_EP in providers:
        from .backends.tensorrt.build import profiles

        settings = ep_build_settings(io, options)
        key = EngineKey(options.target_board or "local", tensorrt_version(), manifest_digest(root, manifest),
                        settings_hash(asdict(settings)))
        ep_options[prov.TRT_EP] = prov.trt_ep_options(options.engine_root(root), key, profiles=profiles(settings, io))
    path = graph_file(manifest, prov.graph_kind(providers), root)
    from .paging.select import paging_options

    paging = paging_options(manifest, options)
    if paging is not None and (manifest.get("architecture") or {}).get("moe"):
        if providers[0] != "CPUExecutionProvider":
            raise ConfigError(f"expert paging runs on onnxruntime's CPU provider, not {providers[0]}",
                              hint="load with provider='cpu', or give a memory budget the whole model fits in")
        from .paging.experts import ExpertPagedBackend, ExpertPagingOptions

        return ExpertPagedBackend(root, manifest, path, io,
                                  ExpertPagingOptions(paging.budget_bytes, paging.read_bytes_per_s, policy=options.expert_cache),
                                  threads=options.num_threads, accuracy_level=options.accuracy_level)
    if paging is not None:
        fused = fused_graph_for(root, manifest, options, providers)
        if fused is not None:
            from .paging.fused import FusedPagedBackend

            return FusedPagedBackend(root, manifest, io, paging, fused, providers=providers, threads=options.num_threads,
                                     accuracy_level=options.accuracy_level, huge_pages=options.huge_pages)
        from .paging.backend import PagedBackend

        return PagedBackend(root, manifest, path, io, paging, providers=prov.with_options(providers, ep_options),
                            threads=options.num_threads, accuracy_level=options.accuracy_level)
    from .backends.ort import OrtBackend

    fused = fused_graph_for(root, manifest, options, providers)
    backend = OrtBackend(fused.path if fused else path, io, providers=prov.with_options(providers, ep_options),
                         threads=options.num_threads, accuracy_level=options.accuracy_level, fused=fused,
                         huge_pages=options.huge_pages)
    if options.log_provider:
        log.info("runtime: %s on %s (%d threads, MatMulNBits accuracy level %d)", path.name,
                 " > ".join(backend.session.get_providers()), options.num_threads, options.accuracy_level)
    return backend


def fused_graph_for(root: Path, manifest: dict, options: RuntimeOptions, providers: list):
    """The fused graph (fused_graph.FusedGraph) when this load runs it, else None. 'auto' picks it on the
    CPU provider whenever the bundle allows; 'fused' insists (and says why not)."""
    from .backends import fused as fused_graph

    if options.graph == "standard":
        return None
    why = fused_graph.supported(manifest)
    if why is None and providers[0] != prov.CPU_EP:
        why = f"the fused graph is built for the CPU provider, this load runs {providers[0]}"
    if why is not None:
        if options.graph == "fused":
            raise ConfigError(f"graph='fused' is not available: {why}", hint="use graph='auto' or 'standard'")
        return None
    model_max = int(manifest["architecture"].get("max_position_embeddings") or fused_graph.DEFAULT_POSITIONS)
    positions = max(options.max_seq_len or 0, min(model_max, fused_graph.DEFAULT_POSITIONS))
    graph = fused_graph.ensure(root, manifest, manifest_digest(root, manifest), options.engine_root(root), options.accuracy_level, positions)
    return fused_graph.FusedGraph(graph, positions, fused_graph.EmbeddingRows(root, manifest))
