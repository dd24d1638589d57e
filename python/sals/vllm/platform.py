"""The CPU platform with the SALS attention backend: vLLM's CpuPlatform, which picks its
attention backend itself (it ignores attention_backend), routing attention to SALS whenever the
configuration carries additional_config["sals"], and to vLLM's own CPU attention otherwise."""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.platforms.cpu import CpuPlatform

from .. import UnsupportedError
from . import _plan

BACKEND = "sals.vllm.backend.SalsAttentionBackend"
# under vLLM's logger, whose handlers and level vLLM configures (a logger of its own would not
# print at INFO)
logger = init_logger("vllm.plugins.sals")


class SalsCpuPlatform(CpuPlatform):
    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)
        # vLLM remembers each layer shape's backend for the life of the process, whatever the
        # configuration: a second engine in one process (VLLM_ENABLE_V1_MULTIPROCESSING=0, a
        # notebook) would keep the first one's choice, with or without SALS. A new
        # configuration chooses afresh.
        from vllm.v1.attention import selector

        selector._cached_get_attn_backend.cache_clear()
        # Made here, in the front end, so that a wrong setting, model or calibration is refused
        # before an engine process starts; the worker makes the same plan again.
        if vllm_config.model_config is not None and _plan.settings_of(vllm_config) is not None:
            plan = _plan.make_plan(vllm_config)
            cfg = plan.configs[0]
            dense = 2 * cfg.dk * vllm_config.model_config.dtype.itemsize
            window = plan.window_capacity * 2 * cfg.dk * (4 if cfg.dtype == "float32" else 2)
            logger.info(
                "SALS: %d bytes per token and layer (dense K and V: %d, %.2fx the tokens), rank "
                "%d, %d-bit values, window stores of %d tokens (%.1f MiB for all %d layers, "
                "outside vLLM's KV memory)", plan.slot_bytes, dense, dense / plan.slot_bytes,
                cfg.resolved_rank(), cfg.value_bits, plan.window_capacity,
                window * plan.n_layers / 2**20, plan.n_layers)

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        # vllm.config imports this module while it initialises: import it when called
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
        if vllm_config is None or _plan.settings_of(vllm_config) is None:
            return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)
        c = attn_selector_config
        refused = [("MLA attention", c.use_mla), ("sparse attention", c.use_sparse),
                   ("sliding-window attention layers", c.has_sliding_window),
                   ("attention sinks", c.has_sink),
                   (f"{c.attn_type} attention", c.attn_type != "decoder")]
        for what, present in refused:
            if present:
                raise UnsupportedError(f"model: {what} are not supported by the SALS backend "
                                       f"(it serves full causal attention layers)")
        _plan.activate(vllm_config)  # customize_spec reads it later in this process
        return BACKEND
