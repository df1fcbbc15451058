"""The local page of ``feda2v serve``: drop or record a clip, see its pictures and nearest classes.

Why Starlette (+ uvicorn, python-multipart) and not Gradio: the page is one form and one result view;
Starlette serves it in a few hundred lines we control, with no JavaScript bundle, fonts or CDN assets to
fetch, no analytics or version checks to switch off, and three small dependencies (Gradio brings
FastAPI, pandas, a hub client and a front-end that loads assets at run time). Everything the page shows
is inline: the images come back as ``data:`` URIs, the CSS and the recorder script are in the page.

What it guards:

* **one model, a queue**: the pipeline is loaded once, before the server accepts requests; requests
  take turns on it (an ``asyncio.Lock``); beyond ``queue_limit`` waiting requests the answer is 503
  "busy", never a second model in memory;
* **upload size**: a request whose declared or actual body exceeds ``max_upload_mb`` is refused (413)
  before the file is decoded; the pipeline's own file-size bound applies as well;
* **bad files**: answered with a page naming the file and the reason (400), never a stack trace;
* **browsing a run**: ``/run/...`` serves files of that run's folder only (Starlette's ``StaticFiles``
  resolves every path and refuses any outside it, symlinks included); ``/report`` is its ``report.html``.
"""

from __future__ import annotations

import asyncio
import base64
import html
import io
import logging
import tempfile
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from common.imagine.pipeline import AudioToImagePipeline
from common.names import safe_name

__all__ = ["create_app"]

log = logging.getLogger(__name__)

FIELD = "audio"  # the form field of the upload

STYLE = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{font-size:1.4rem} .box{border:1px solid #ccc;border-radius:8px;padding:1rem;margin:1rem 0}
img.pic{width:192px;height:192px;image-rendering:pixelated;margin:4px;border:1px solid #ddd}
table{border-collapse:collapse} td,th{padding:2px 10px;text-align:left} .err{color:#a00}
button,input[type=submit]{font-size:1rem;padding:.3rem .8rem}
"""

RECORDER = """
<script>
let rec=null, chunks=[];
async function toggle(btn){
  if(rec){rec.stop();return;}
  const stream=await navigator.mediaDevices.getUserMedia({audio:true});
  rec=new MediaRecorder(stream); chunks=[];
  rec.ondataavailable=e=>chunks.push(e.data);
  rec.onstop=async()=>{
    stream.getTracks().forEach(t=>t.stop()); btn.textContent='Record'; rec=null;
    const ctx=new AudioContext(); const buf=await ctx.decodeAudioData(await new Blob(chunks).arrayBuffer());
    const x=buf.getChannelData(0), n=x.length, v=new DataView(new ArrayBuffer(44+2*n));
    const w=(o,s)=>{for(let i=0;i<s.length;i++)v.setUint8(o+i,s.charCodeAt(i));};
    w(0,'RIFF');v.setUint32(4,36+2*n,true);w(8,'WAVE');w(12,'fmt ');v.setUint32(16,16,true);v.setUint16(20,1,true);
    v.setUint16(22,1,true);v.setUint32(24,buf.sampleRate,true);v.setUint32(28,2*buf.sampleRate,true);
    v.setUint16(32,2,true);v.setUint16(34,16,true);w(36,'data');v.setUint32(40,2*n,true);
    for(let i=0;i<n;i++)v.setInt16(44+2*i,Math.max(-1,Math.min(1,x[i]))*32767,true);
    const form=new FormData(); form.append('audio',new Blob([v],{type:'audio/wav'}),'recording.wav');
    const r=await fetch('imagine',{method:'POST',body:form}); document.open(); document.write(await r.text()); document.close();
  };
  rec.start(); btn.textContent='Stop';
}
</script>
"""


def _page(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><html lang=en><head><meta charset=utf-8><title>feda2v: sound in, picture out"
                        f"</title><style>{STYLE}</style></head><body><h1>feda2v: sound in, picture out</h1>{body}"
                        f"</body></html>", status_code=status)


def _png_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def create_app(pipe: AudioToImagePipeline, run_dir: Path | None = None, max_upload_mb: float = 20.0,
               queue_limit: int = 8, n: int | None = None) -> Starlette:
    """The page for an already loaded ``pipe``; ``run_dir`` adds ``/report`` and ``/run/...``."""
    limit = int(max_upload_mb * 2**20)
    lock = asyncio.Lock()
    waiting = 0
    report = run_dir is not None and (Path(run_dir) / "report.html").is_file()

    def form_box(message: str = "") -> str:
        links = ' · <a href="report">the run\'s report</a>' if report else ""
        return (f'<div class=box>{message}<form action="imagine" method="post" enctype="multipart/form-data">'
                f'<p>An audio file (wav, flac, ogg, mp3; up to {max_upload_mb:g} MiB; the first '
                f'{pipe.audio.clip_seconds:g} s are heard):</p><input type=file name={FIELD} id=audio accept="audio/*"> '
                f'<input type=submit id=go value="Imagine"> <button type=button onclick="toggle(this)">Record</button>'
                f'</form><p>Classes: {html.escape(", ".join(pipe.classes))}{links}</p></div>{RECORDER}')

    async def index(request: Request) -> Response:
        return _page(form_box())

    def refuse(message: str, status: int) -> Response:
        return _page(form_box(f'<p class=err id=error>{html.escape(message)}</p>'), status)

    async def imagine(request: Request) -> Response:
        nonlocal waiting
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit + 65536):
            return refuse(f"the upload is larger than {max_upload_mb:g} MiB", 413)
        try:
            form = await request.form(max_files=1, max_fields=4, max_part_size=limit)
        except Exception as err:  # multipart errors: too large, malformed; the message is safe to show
            return refuse(f"the upload could not be read: {getattr(err, 'detail', None) or err}", 413
                          if "size" in str(getattr(err, "detail", err)).lower() else 400)
        upload = form.get(FIELD)
        if upload is None or isinstance(upload, str):
            return refuse("choose an audio file first", 400)
        name = Path(upload.filename or "upload").name
        data = await upload.read(limit + 1)
        if len(data) > limit:
            return refuse(f"{name}: larger than {max_upload_mb:g} MiB", 413)
        if waiting >= queue_limit:
            return refuse(f"busy: {waiting} requests are waiting; try again in a moment", 503)
        waiting += 1
        try:
            async with lock:
                result = await run_in_threadpool(_imagine_bytes, pipe, data, name, n)
        finally:
            waiting -= 1
        if result.failed:
            return refuse(f"{name}: {result.failed[0][1]}", 400)
        clip = result.clips[0]
        rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{s:.3f}</td></tr>" for c, s in clip.top)
        pics = "".join(f'<img class=pic alt="{html.escape(clip.nearest)} {k}" src="{_png_uri(im)}">'
                       for k, im in enumerate(clip.images, 1))
        body = (f'<div class=box id=result><p><b>{html.escape(name)}</b> sounds most like '
                f'<b id=nearest>{html.escape(clip.nearest)}</b></p><table id=top><tr><th>class</th><th>similarity</th></tr>'
                f'{rows}</table><div>{pics}</div></div>')
        return _page(body + form_box())

    async def report_page(request: Request) -> Response:
        if not report:
            return _page('<p class=err>no run report here (serve a run with --run)</p>', 404)
        return RedirectResponse("run/report.html")

    routes = [Route("/", index), Route("/imagine", imagine, methods=["POST"]), Route("/report", report_page)]
    if run_dir is not None:
        routes.append(Mount("/run", app=StaticFiles(directory=str(run_dir)), name="run"))
    return Starlette(routes=routes)


def _imagine_bytes(pipe: AudioToImagePipeline, data: bytes, name: str, n: int | None):
    """Decode an upload through a temporary file (libsndfile reads by path), then run the pipeline."""
    suffix = Path(safe_name(name)).suffix[:10]
    with tempfile.TemporaryDirectory(prefix="feda2v-serve-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        result = pipe([str(path)], n=n)
    result.failed = [(name, reason) for _, reason in result.failed]
    for clip in result.clips:
        clip.source = name
    return result
