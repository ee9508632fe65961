"""The read-only live view of the mesh at ``/ui``: services, proxies and the push path.

The page is plain HTML, CSS and JavaScript served from this package (no build step, no CDN).
Its rows come from the JSON endpoints under ``/ui/api`` (filtered and paged on the server);
a Server-Sent Events stream (``/ui/api/events``) tells it what changed. A panel is one entry
in the page's panel table, one JSON endpoint and one kind of delta in the stream.
"""
