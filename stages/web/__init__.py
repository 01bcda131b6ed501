"""Web-document stages: HTML conversion, record reading, safe image loading."""
