"""Images for every vision app (classify, transfer, caption, diagnose):
datasets and their splits, the tf.data pipeline, backbones, the classifier
head, the classification report and the classifier export."""
