"""Event role: S3 "object created" notifications for ``incoming/`` delivered to SQS."""

from __future__ import annotations

import json
from urllib.parse import unquote_plus

import dagster as dg

from resources.aws import AwsResource


def parse_s3_event(body: str) -> list[tuple[str, str, str]]:
    """(bucket, key, etag) of each ObjectCreated record; [] for test events and others.

    Keys arrive URL-encoded with ``+`` for spaces (and, on some emulators, ``%2F``)."""
    try:
        msg = json.loads(body)
    except ValueError:
        return []
    if isinstance(msg, dict) and "Message" in msg and "TopicArn" in msg:  # wrapped by SNS
        return parse_s3_event(msg["Message"])
    if not isinstance(msg, dict) or msg.get("Event") == "s3:TestEvent":
        return []
    out = []
    for r in msg.get("Records", []):
        if not r.get("eventName", "").startswith("ObjectCreated"):
            continue
        s3 = r["s3"]
        out.append(
            (s3["bucket"]["name"], unquote_plus(s3["object"]["key"]), s3["object"].get("eTag", ""))
        )
    return out


class PackEvents(AwsResource):
    queue_url: str | None = None  # None: no notifications; the listing sensor alone finds packs
    visibility_timeout: int = 300  # longer than a sensor tick: receipts are deleted one tick later
    max_messages: int = 200

    def receive(self) -> list[dict]:
        """Drain up to ``max_messages``: [{"receipt", "objects": [(bucket, key, etag)]}]."""
        sqs, out = self._client("sqs"), []
        while len(out) < self.max_messages:
            resp = sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=0,
                VisibilityTimeout=self.visibility_timeout,
            )
            msgs = resp.get("Messages", [])
            if not msgs:
                break
            out += [
                {"receipt": m["ReceiptHandle"], "objects": parse_s3_event(m["Body"])} for m in msgs
            ]
        return out

    def delete(self, receipts: list[str]) -> None:
        sqs = self._client("sqs")
        for i in range(0, len(receipts), 10):
            entries = [
                {"Id": str(n), "ReceiptHandle": r} for n, r in enumerate(receipts[i : i + 10])
            ]
            sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)


class IncomingListing(dg.ConfigurableResource):
    """How the listing sensor finds new zips under ``incoming/``. Each tick it lists after the
    last key it saw, and in full every ``relist_seconds``, because a listing after a key cannot see
    keys that sort before it. 0 lists in full every tick: a directory scan on the local lake, and
    on S3 one request per 1,000 zips (where SQS notifications are the primary path)."""

    relist_seconds: float = 0.0
