"""``feda2v serve``: a local page on a pipeline (optional extra ``feda2v[serve]``: Starlette, uvicorn,
python-multipart); :mod:`ops.serve.app` builds the page."""
