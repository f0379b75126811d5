"""The data audit (`python audit.py`): leaks and duplicates across and within splits, likely
wrong labels, outliers, class balance, image sizes and the unreadable files, all from one pass
over the files and one forward pass of the backbone (the feature cache training uses).

One module per finding: `files` (hashes, headers, pixel thumbnails), `similarity` (the blocked
search), `duplicates`, `label_issues`, `outliers`, `stats`, `exclude`; `pictures` and `report`
write them out."""
