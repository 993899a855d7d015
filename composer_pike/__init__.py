"""composer-pike: PiKE adaptive data mixing for MosaicML Composer over mosaicml-streaming domains."""
