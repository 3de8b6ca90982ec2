"""Media in and out of the server: import from the specific module, there is no re-export here.

- `signing`: signed, expiring URLs of our files (outputs and uploads), the URL prefixes.
- `uploads`: uploaded input images on disk and in the job table; safe names; upload URL parsing.
- `net`: which addresses outbound requests may reach, and the httpx client that enforces it on
  every connection (image downloads, webhooks); legacy IPv4 host forms.
- `fetch`: the `image` field of a job to image bytes (data: URI, own upload, capped download);
  the CLI's `generate --image URL` uses the same download.
- `images`: torch-free decoding of image bytes (format allow-list, pixel cap), the SkyReels crop.
"""
