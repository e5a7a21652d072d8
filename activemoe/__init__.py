"""ActiveMoE: run Mixture-of-Experts models from Hugging Face checkpoints with routed experts offloaded."""
from activemoe.config import CacheConfig, EngineConfig, SamplingConfig
from activemoe.engine import Engine, load

__all__ = ["CacheConfig", "Engine", "EngineConfig", "SamplingConfig", "load"]
