"""sals.vllm: SALS as an attention backend of vLLM (CPU), installed with ``pip install
"sals[vllm]"`` and enabled per run by ``additional_config={"sals": {...}}`` (the command
line's ``--additional-config '{"sals": {...}}'``); docs/vllm.md has the settings.

vLLM finds it through the ``vllm.platform_plugins`` entry point ``sals`` (an installed entry
point, because vLLM spawns its engine and worker processes): wherever vLLM's own CPU platform
would run, :func:`platform_plugin` names ``sals.vllm.platform.SalsCpuPlatform`` instead, which
is vLLM's CPU platform routing attention to SALS when the configuration asks for it, and
unchanged otherwise.
"""

from __future__ import annotations


def platform_plugin() -> str | None:
    """vLLM platform plugin: the SALS CPU platform where vLLM's CPU platform is active, else
    None (the plugin stays out of GPU and other platforms)."""
    from vllm.platforms import cpu_platform_plugin

    return "sals.vllm.platform.SalsCpuPlatform" if cpu_platform_plugin() is not None else None
