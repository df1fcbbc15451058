"""Images from sound: render backends (FLUX.1), conditioning sources, image sets on disk."""
