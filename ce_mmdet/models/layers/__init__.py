from .channel_equilibrium import ChannelEquilibrium

__all__ = ['ChannelEquilibrium']
