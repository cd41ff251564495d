import torch

torch.set_num_threads(1)
from weatherpeft import metrics
from weatherpeft.backbones import backbone_statistics
from weatherpeft.tasks.precipitation import PrecipitationTask, _millimetres

t = PrecipitationTask(None, None, backbone_statistics("models/aurora-tiny"))
ds = t.datasets()["test"]
inputs, truth = t.collate([ds[i] for i in range(len(ds))])
clim = t.climatology()
lat = torch.from_numpy(t._selection.lat.copy())
now = _millimetres(t.observed_now(inputs), 1000.0)
def seeps(f, o):
    return float(metrics.seeps(f / 1000, o / 1000, clim.dry_fraction, clim.wet_threshold, lat, dry_threshold=0.1, dim=None))
def cat(x, thr):
    return (x > 0.1).int() + (x > thr * 1000).int()
pool = torch.nn.functional.avg_pool2d
for step in (1, 2, 3):
    obs = _millimetres(truth.surf_vars["tp"][:, step - 1], 1000.0)
    smooth = pool(now[:, None], 3, 1, 1, count_include_pad=False)[:, 0]
    mean_pers = 0.5 * (now + _millimetres(inputs.surf_vars["tp_12h"][:, 0], 1000.0))
    same = (cat(now, clim.wet_threshold) == cat(obs, clim.wet_threshold)).float().mean()
    print(f"lead {12*step}h: persistence {seeps(now, obs):.3f}  3x3-smoothed persistence {seeps(smooth, obs):.3f}  "
          f"mean of t-12h,t {seeps(mean_pers, obs):.3f}  0.8*persistence {seeps(0.8*now, obs):.3f}  "
          f"category unchanged {float(same):.2f}")
