"""composer-pike: PiKE adaptive data mixing for MosaicML Composer over mosaicml-streaming domains."""
from composer_pike.algorithms import LossSlope, PiKE
from composer_pike.callbacks import MixtureMonitor
from composer_pike.data import DomainSource, MixtureDataset, build_mixture_dataloader, sources_from_manifest

__all__ = ['PiKE', 'LossSlope', 'MixtureMonitor', 'DomainSource', 'MixtureDataset', 'build_mixture_dataloader',
           'sources_from_manifest']
