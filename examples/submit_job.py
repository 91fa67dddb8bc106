"""Submitting a job with the official NATS Python client: the protocol is plain JSON over NATS, nothing imago-
specific is needed on the dispatcher side.

    pip install nats-py
    python examples/submit_job.py nats://127.0.0.1:4222 "a red circle on a white background" out.png [MODEL]

Needs a running `imago worker` (which creates the streams) on the same server.
"""

import asyncio
import base64
import json
import sys
import uuid

import nats


async def main(url, prompt, output, model):
    nc = await nats.connect(url)
    js = nc.jetstream()
    job_id = f"py-{uuid.uuid4().hex[:12]}"
    done = asyncio.get_running_loop().create_future()

    async def on_result(msg):
        if not done.done():
            done.set_result(json.loads(msg.data))

    async def on_progress(msg):
        event = json.loads(msg.data)
        if event.get("step"):
            print(f"step {event['step']}/{event['total']}", file=sys.stderr)

    # Subscribe first, then publish: no event can be missed.
    await nc.subscribe(f"imago.results.{job_id}", cb=on_result)
    await nc.subscribe(f"imago.progress.{job_id}", cb=on_progress)
    job = {"v": 1, "id": job_id, "kind": "generate", "model": model, "prompt": prompt, "seed": 42}
    await js.publish("imago.jobs.generate", json.dumps(job).encode(), headers={"Nats-Msg-Id": job_id})

    result = await asyncio.wait_for(done, timeout=300)
    if result["status"] != "ok":
        raise SystemExit(f"job failed: {result['error']}")
    image = result["images"][0]
    if "inline" in image:
        data = base64.b64decode(image["inline"])
    else:  # large results live in the object store
        store = await js.object_store("imago-images")
        data = (await store.get(image["object"])).data
    with open(output, "wb") as f:
        f.write(data)
    print(output, result["seeds"])
    await nc.close()


if __name__ == "__main__":
    args = sys.argv[1:] + [None] * 4
    asyncio.run(main(args[0] or "nats://127.0.0.1:4222", args[1] or "a red circle on a white background",
                     args[2] or "out.png", args[3] or "default"))
