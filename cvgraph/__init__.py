"""cvgraph: image packs in, trained and exported vision models out, with full lineage.

from cvgraph import Datasets
ds = Datasets()
ds.sql_query("SELECT label, count(*) AS n FROM images GROUP BY label")
ds.freeze_dataset("digits_v1", "SELECT * FROM images WHERE pack_id = 'digits'")
"""

from cvgraph.sdk import (
    CvgraphError,
    Datasets,
    FreezeRefused,
    PackNotIngested,
    RunFailed,
    UnknownKey,
    Upload,
)

__all__ = [
    "CvgraphError",
    "Datasets",
    "FreezeRefused",
    "PackNotIngested",
    "RunFailed",
    "UnknownKey",
    "Upload",
]
