"""Everything tf.data and TFRecord: demo data, masks, records, build, input."""
