print("scsigate: under construction")
