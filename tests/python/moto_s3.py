"""An S3-compatible server for tests/object_store.rs: moto's server on a free loopback port,
with one bucket made, until stdin closes.

usage: moto_s3.py BUCKET [IP] — listens on IP (default 127.0.0.1), prints
"READY http://IP:PORT" once the bucket exists.
"""

import os
import sys

import boto3
from moto.server import ThreadedMotoServer


def main():
    bucket = sys.argv[1]
    ip = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    server = ThreadedMotoServer(ip_address=ip, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=bucket)
    print(f"READY {url}", flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()
