"""Sample quality with the standard networks: FID's InceptionV3 (:mod:`.inception`) and the
Frechet distance with its statistics files (:mod:`.fid`)."""
