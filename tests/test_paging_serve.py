"""`edge-sdk serve` with a weights budget: the daemon pages layers, accounts the executor's memory,
and answers exactly as the paged runtime does (official openai client over real HTTP)."""

from __future__ import annotations

import openai
import pytest

pytest.importorskip("onnxruntime")

import edge_sdk  # noqa: E402
from edge_sdk.cli.serve import overrides  # noqa: E402
from edge_sdk.runtime.generate.generation import GenerationConfig  # noqa: E402
from edge_sdk.runtime.paging.backend import PagedBackend  # noqa: E402
from edge_sdk.runtime.paging.fused import FusedPagedBackend  # noqa: E402
from edge_sdk.runtime.server.config import ServeConfig, parse_config  # noqa: E402
from edge_sdk.runtime.server.daemon import build_service  # noqa: E402
from test_paging import deep_bundle  # noqa: E402,F401  (fixture)
from test_server_helpers import ServerThread  # noqa: E402


def test_serve_pages_when_the_weights_exceed_the_budget(deep_bundle):  # noqa: F811
    bundle = deep_bundle("qwen2")
    config = ServeConfig(bundle=str(bundle), emulate="agx-orin-64gb").with_overrides(memory_weights_budget="25%")
    service = build_service(config)
    backend = service.state.model.backend
    assert isinstance(backend, (PagedBackend, FusedPagedBackend))
    assert backend.options.read_bytes_per_s > 0  # the emulated board's storage speed
    assert service.state.memory.layout.weights_bytes >= backend.plan.peak_bytes
    reference = edge_sdk.load(bundle, memory_budget="25%", emulate="agx-orin-64gb")
    prompt = "Layers stream from storage"
    ids = reference.tokenizer.encode(prompt)
    want = "".join(c.text for c in reference.generator.stream([ids], GenerationConfig(max_new_tokens=12, temperature=0.0)))
    with ServerThread(service.state) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        r = c.completions.create(model=s.state.model_id, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want
    backend.close()
    reference.backend.close()


def test_serve_budget_from_the_config_file_and_the_command_line():
    assert parse_config({"memory": {"weights_budget": "50%"}}).memory.weights_budget == "50%"
    from edge_sdk.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--memory-budget", "3000000000"])  # every flag serve has
    assert ServeConfig().with_overrides(**overrides(args)).memory.weights_budget == "3000000000"
