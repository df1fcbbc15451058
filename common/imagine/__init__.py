"""Sound in, picture out: the portable :class:`AudioToImagePipeline` (``pipeline``), how any audio file or
waveform becomes a clip (``inputs``), a run folder's pipeline (``export``) and a folder of pictures from
audio files (``job``, ``feda2v imagine``)."""
